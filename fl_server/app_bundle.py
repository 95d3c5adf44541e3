"""The fedrec app as Flower packs it into a FAB, read without walking the directories the app's .gitignore drops.

Flower's own builder (`flwr run <dir>`, `flwr build`) lists every file under the app directory and filters after:
a checkout with its virtual environment inside (`make install` puts `.venv` there) is ~57,000 files, 9-15 s of
CPU at each `fedrec-server` start and each `fedrec-admin sign-app`. Here a directory the .gitignore ignores as a
whole is not entered; the FAB is Flower's, built from the same files (tests/fl_server/test_app_bundle.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def app_files(app_dir: Path) -> dict[str, Path]:
    """The files Flower's `collect_files` lists for `app_dir` (relative POSIX path -> file; no symlinks, nothing
    outside it), except those in a directory its .gitignore ignores, which Flower's filter drops anyway."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = app_dir.resolve()
    patterns = load_gitignore_patterns(root / ".gitignore")
    # A negation (`!pattern`) could take a file back from an ignored directory: then walk everything, as Flower does.
    ignored = None if any(p.startswith("!") for p in patterns) else build_pathspec(patterns)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        prefix = here.relative_to(root).as_posix() + "/" if here != root else ""
        if ignored is not None:
            dirnames[:] = [d for d in dirnames if not ignored.match_file(f"{prefix}{d}/")]
        for name in filenames:
            path = here / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):
                files[prefix + name] = path
    return files


def build_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run app_dir` submits (Flower's deterministic builder on `app_files`)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app_dir))[0]


def fab_sha256(app_dir: Path) -> str:
    """The hash an app signature names: that of `build_fab(app_dir)`."""
    return hashlib.sha256(build_fab(app_dir)).hexdigest()


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files that go into the app's FAB to `dest` (emptied first) and return it: `flwr run dest` builds
    the same FAB as `flwr run app_dir`, and reads a few hundred files instead of the whole checkout."""
    from flwr.cli.utils import filter_paths_for_publish

    shutil.rmtree(dest, ignore_errors=True)
    for relative, source in filter_paths_for_publish(app_files(app_dir)).items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return dest
