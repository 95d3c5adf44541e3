"""Start a training from an exported model directory instead of fresh weights (fine-tune last month's model,
or one pre-trained on public data), checked against the run's catalog and model settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from shared_model import wire
from shared_model.catalog import CatalogMismatchError, ItemCatalog
from shared_model.modeling_fedrec import FedRecModel
from shared_model.serialization import load_model_dir

log = logging.getLogger(__name__)
INITIAL_MODEL_FILE = "initial_model.json"  # in the run directory: where the first round's weights came from
FROZEN_ATOL = 1e-6  # frozen public tensors agreeing this closely are the same tensors, rounded differently
# Not a model setting: the catalog is checked on its own (catalog.json), never reported as a setting that differs.
IGNORED_CONFIG_KEYS = {"catalog_fingerprint"}


class InitialModelError(ValueError):
    """The exported model does not fit this run (catalog, tensors or frozen public tensors differ)."""


def config_differences(ours: FedRecModel, theirs: FedRecModel) -> dict[str, tuple[Any, Any]]:
    """Model settings (config.json keys) that differ: {key: (this run's, the exported model's)}."""
    a, b = ours.config.to_dict(), theirs.config.to_dict()
    return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - IGNORED_CONFIG_KEYS) if a.get(k) != b.get(k)}


def load_initial_model(model: FedRecModel, catalog: ItemCatalog, directory: str | Path) -> dict[str, Any]:
    """Copy an exported model's trainable weights into the run's fresh model, after checking that it was made
    for the same catalog and has exactly this model's tensors (the frozen public ones equal up to rounding).
    Returns what to record in the run directory."""
    directory = Path(directory)
    if not directory.is_absolute():
        raise InitialModelError(f"initial model {directory}: give an absolute path (the ServerApp runs from an "
                                "installed copy of the app)")
    exported, exported_catalog = load_model_dir(directory)
    if exported_catalog.fingerprint != catalog.fingerprint:
        raise CatalogMismatchError(
            f"initial model {directory}: its catalog.json ({exported_catalog.fingerprint[:12]}..., "
            f"{len(exported_catalog.item_ids)} items) is not this run's catalog ({catalog.fingerprint[:12]}..., "
            f"{len(catalog.item_ids)} items): item rows would mean other items")
    ours, theirs = wire.full_state(model), wire.full_state(exported)
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    reshaped = sorted(f"{k} {tuple(theirs[k].shape)} (this run: {tuple(ours[k].shape)})"
                      for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or unexpected or reshaped:
        raise InitialModelError(
            f"initial model {directory / 'model.safetensors'} does not fit this run's model (its model.* "
            f"settings): missing {missing}, unexpected {unexpected}, other shapes {reshaped}")
    trainable = wire.trainable_state(model)
    # The run keeps the frozen public tensors it built; the exported ones must agree up to float rounding (an
    # SVD of the item attributes differs in the 9th decimal with the number of threads).
    changed_frozen = sorted(f"{k} (max |difference| {float((ours[k].double() - theirs[k].double()).abs().max()):.3g})"
                            for k in ours if k not in trainable
                            and not torch.allclose(ours[k].double(), theirs[k].double(), rtol=0.0, atol=FROZEN_ATOL))
    if changed_frozen:
        raise InitialModelError(
            f"initial model {directory / 'model.safetensors'}: its frozen public tensors {changed_frozen} differ "
            "from the ones this run builds (other item features or model settings); train from fresh weights "
            "or with the settings the model was exported with")
    differences = config_differences(model, exported)
    wire.load_state(model, {k: theirs[k] for k in trainable}, trainable_only=True)
    if differences:
        log.info("initial model %s was exported with other settings (this run's, its): %s", directory,
                 differences)
    log.info("first round starts from the exported model %s (%d tensors)", directory, len(trainable))
    return {"path": str(directory), "tensors": len(trainable),
            "settings_differing": {k: list(v) for k, v in differences.items()}}


def record(run_dir: Path, info: dict[str, Any]) -> None:
    """Write initial_model.json so a resumed run and the report still say where training started."""
    (run_dir / INITIAL_MODEL_FILE).write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")


def recorded(run_dir: Path) -> dict[str, Any] | None:
    """What `record` wrote, or None for a training that started from fresh weights."""
    path = run_dir / INITIAL_MODEL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
