"""The app's FAB without walking ignored directories: the same bytes as Flower's own builder."""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fl_server.app_bundle import app_files, build_fab, fab_sha256, stage_app

PROJECT = Path(__file__).resolve().parents[2]


def make_app(root: Path, gitignore: str) -> Path:
    """A small app: the project's pyproject.toml, a package, and what a checkout also holds (a virtual
    environment, caches, outputs, a symlink out of the app)."""
    files = {
        "pyproject.toml": (PROJECT / "pyproject.toml").read_text(),
        ".gitignore": gitignore,
        "README.md": "# app\n",
        "LICENSE": "license\n",
        "fl_server/__init__.py": "",
        "fl_client/__init__.py": "",
        "shared_model/__init__.py": "",
        "fl_server/server_app.py": "app = None\n",
        "fl_server/conf/run.yaml": "a: 1\n",
        "tests/test_x.py": "def test(): pass\n",
        ".venv/lib/site-packages/pkg/__init__.py": "x = 1\n",
        ".venv/lib/site-packages/pkg/data.json": "{}\n",
        "fl_server/__pycache__/server_app.cpython-311.pyc": "compiled",
        "outputs/run1/metrics.jsonl": "{}\n",
        "outputs/run1/keep.py": "y = 2\n",
        "fl_server/outputs/keep.py": "z = 3\n",  # an ignored directory inside a package the FAB takes
        "docs/guide.md": "guide\n",
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    outside = root.parent / "outside.py"
    outside.write_text("secret = 1\n")
    os.symlink(outside, root / "fl_server" / "linked.py")
    return root


@pytest.mark.parametrize("gitignore", [
    ".venv/\n__pycache__/\noutputs/\n",
    ".venv/\n__pycache__/\noutputs/\n!fl_server/outputs/keep.py\n",  # negated: the whole tree is walked
    "",
])
def test_the_fab_is_flowers_own_for_the_same_app(tmp_path, gitignore):
    app = make_app(tmp_path / "app", gitignore)
    flowers = build_fab_from_disk(app)
    assert build_fab(app) == flowers
    assert fab_sha256(app) == hashlib.sha256(flowers).hexdigest()
    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == flowers  # what `flwr run <staged>` submits
    assert not (staged / ".venv").exists() and not (staged / "fl_server" / "linked.py").exists()


def test_ignored_directories_are_not_entered(tmp_path):
    app = make_app(tmp_path / "app", ".venv/\n__pycache__/\noutputs/\n")
    listed = app_files(app)
    assert "fl_server/server_app.py" in listed and "docs/guide.md" in listed
    assert not any(p.startswith((".venv/", "outputs/")) or "__pycache__" in p for p in listed)
    assert "fl_server/linked.py" not in listed  # a symlink, as Flower skips it


def test_staging_empties_the_destination_first(tmp_path):
    app = make_app(tmp_path / "app", ".venv/\n")
    staged = stage_app(app, tmp_path / "staged")
    (staged / "stale.py").write_text("left over from an earlier start\n")
    shutil.rmtree(app / "docs")
    staged = stage_app(app, tmp_path / "staged")
    assert not (staged / "stale.py").exists() and not (staged / "docs").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
