"""The server's run directory: an atomic checkpoint after every round, the best model so far, one JSON line
per round, and the training id that keeps the sites' ledgers consistent across restarts."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared_model import wire
from shared_model.atomic import write_text_atomically

WEIGHTS = "weights.safetensors"
# What an optimiser.pt of an older fedrec (NumPy arrays, pickled) needs besides tensors: NumPy's array and
# scalar reconstructors (named by how NumPy pickles them) and numeric dtypes only, so reading one still runs
# no code (no object arrays, no other classes).
NUMERIC_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                  np.float16, np.float32, np.float64)
NUMPY_GLOBALS: list[Any] = [np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0], np.ndarray, np.dtype,
                            *(type(np.dtype(kind)) for kind in NUMERIC_DTYPES)]


@dataclass
class Checkpoint:
    """The state after a completed round."""

    round: int
    state: dict[str, torch.Tensor]
    optimiser_state: dict[str, Any]
    best_round: int
    best_score: float


def to_tensors(value: Any) -> Any:
    """NumPy arrays (the strategies' optimiser state) as tensors and NumPy scalars as Python numbers, in nested
    dicts and lists: what torch.load(weights_only=True) reads back without any allow-list."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_tensors(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_tensors(v) for v in value]
    return value


def to_numpy(value: Any) -> Any:
    """The inverse of to_tensors."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_numpy(v) for v in value]
    return value


def read_optimiser_state(path: Path) -> dict[str, Any]:
    """A checkpoint's server optimiser state, read with weights_only=True (a checkpoint never runs code); the
    NumPy arrays of an older fedrec's checkpoint are allowed as plain numeric arrays. ValueError naming the
    file when it holds anything else or is damaged."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"{path}: the server optimiser state cannot be read safely ({err}); resume from another "
                         "round's checkpoint or start a new out_dir") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the server optimiser state is a {type(state).__name__}, not a dict")
    return to_numpy(state)


def _write_json(path: Path, payload: Any) -> None:
    """Write JSON via a temporary file and an atomic rename."""
    write_text_atomically(path, json.dumps(payload, indent=1))


class RunStore:
    """Checkpoints and metrics of one federated training, under an absolute output directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        if not self.root.is_absolute():
            raise ValueError(f"out_dir must be absolute (the ServerApp runs from an installed copy): {out_dir}")
        self.rounds = self.root / "rounds"
        self.rounds.mkdir(parents=True, exist_ok=True)

    def training_id(self) -> str:
        """A stable id for this training, created once and reused by every resume."""
        path = self.root / "training_id"
        if not path.exists():
            path.write_text(uuid.uuid4().hex)
        return path.read_text().strip()

    def _pointer(self) -> dict[str, Any] | None:
        """latest.json: which round folder is current, and the best round so far."""
        pointer = self.root / "latest.json"
        return json.loads(pointer.read_text(encoding="utf-8")) if pointer.exists() else None

    def latest(self) -> Checkpoint | None:
        """The last completed round's checkpoint, or None for a fresh start."""
        meta = self._pointer()
        if meta is None:
            return None
        folder = self.rounds / meta["folder"]
        return Checkpoint(round=int(meta["round"]), state=load_file(folder / WEIGHTS),
                          optimiser_state=read_optimiser_state(folder / "optimiser.pt"),
                          best_round=int(meta["best_round"]), best_score=float(meta["best_score"]))

    def best_state(self) -> dict[str, torch.Tensor] | None:
        """Weights of the best round so far (None before the first round)."""
        path = self.root / "best" / WEIGHTS
        return load_file(path) if path.exists() else None

    def save(self, server_round: int, state: dict[str, torch.Tensor], optimiser_state: dict[str, Any],
             row: dict[str, Any], score: float | None) -> None:
        """Write round `server_round` atomically (folder rename, then the pointer), and the best model
        (`score`: the round's validation score; None for a round that was not evaluated)."""
        if bad := wire.non_finite(state):  # a NaN model must never replace the last good checkpoint
            raise ValueError(f"round {server_round}: the global model holds NaN or infinite values in {bad[:5]}; "
                             f"not checkpointed (the last good round stays in {self.root})")
        previous = self._pointer()  # metadata only: no need to read the previous weights back
        best_round, best_score = (int(previous["best_round"]), float(previous["best_score"])) if previous \
            else (0, float("-inf"))
        folder = self.rounds / f"round-{server_round:04d}"
        tmp = self.rounds / f".round-{server_round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp / WEIGHTS)
        torch.save(to_tensors(optimiser_state), tmp / "optimiser.pt")
        _write_json(tmp / "metrics.json", row)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        if score is not None and score > best_score:
            best_round, best_score = server_round, score
            best_tmp = self.root / ".best.tmp"
            shutil.rmtree(best_tmp, ignore_errors=True)
            shutil.copytree(folder, best_tmp)
            shutil.rmtree(self.root / "best", ignore_errors=True)
            os.replace(best_tmp, self.root / "best")
        _write_json(self.root / "latest.json", {"round": server_round, "folder": folder.name,
                                                "best_round": best_round, "best_score": best_score})
        if previous is not None and int(previous["round"]) != server_round:
            (self.rounds / previous["folder"] / WEIGHTS).unlink(missing_ok=True)  # keep metrics only
        self._rewrite_metrics_log(server_round)

    def history(self, up_to: int | None = None) -> list[dict[str, Any]]:
        """The per-round rows of every completed round (up to a round, if given), in order."""
        rows = []
        for folder in sorted(self.rounds.glob("round-*")):
            row = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            if up_to is None or row["round"] <= up_to:
                rows.append(row)
        return rows

    def _rewrite_metrics_log(self, up_to: int) -> None:
        """metrics.jsonl: exactly one line per completed round, even after a crash and resume."""
        lines = "".join(json.dumps(row) + "\n" for row in self.history(up_to))
        write_text_atomically(self.root / "metrics.jsonl", lines)
