"""Write a file so that a crash leaves either the old content or the new one, never half of either.

Every on-disk state this project keeps across crashes goes through here: a site's privacy ledger and
preprocessing cache, its optimiser state and cached round reply, and the server's checkpoint metadata.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Call `write` on a temporary file next to `path`, flush it (and sync it to disk), then rename it over `path`.

    The temporary name is unique, so two writers never share one; on any error it is removed and `path` is
    left as it was. Without `durable` the file is not synced before the rename (1-2 ms less a write): a crashed
    process still leaves the old or the new file, but a crash of the machine may leave an empty or partial one,
    so only for files whose loss is safe: a site's kept round reply (a lost one declines the resent round) and
    the caches a site checks when it reads them and rebuilds when they are damaged (its sequences, σ plans and
    events digest).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str, durable: bool = True) -> None:
    """`write_atomically` for UTF-8 text."""
    write_atomically(path, lambda out: out.write(text.encode("utf-8")), durable)
