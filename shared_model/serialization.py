"""The model directory: config.json + safetensors weights + the public item catalog, checked on load."""

from __future__ import annotations

from pathlib import Path

from shared_model.catalog import CatalogMismatchError, ItemCatalog
from shared_model.modeling_fedrec import FedRecModel


def save_model_dir(model: FedRecModel, catalog: ItemCatalog, directory: str | Path) -> Path:
    """Write config.json, model.safetensors and catalog.json; the config records the catalog fingerprint."""
    directory = Path(directory)
    model.config.catalog_fingerprint = catalog.fingerprint
    model.save_pretrained(directory)
    catalog.save(directory)
    return directory


def load_model_dir(directory: str | Path) -> tuple[FedRecModel, ItemCatalog]:
    """Load a model directory and refuse it if the weights were trained on another catalog."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: not a model directory (no config.json)")
    catalog = ItemCatalog.load(directory)
    model = FedRecModel.from_pretrained(directory)
    if model.config.catalog_fingerprint:
        try:
            catalog.check_matches(model.config.catalog_fingerprint)
        except CatalogMismatchError as err:
            raise CatalogMismatchError(f"{directory}: {err}") from err
    if model.config.num_items != len(catalog.item_ids):
        raise CatalogMismatchError(f"{directory}: model has {model.config.num_items} items, catalog has "
                                   f"{len(catalog.item_ids)}")
    return model.eval(), catalog
