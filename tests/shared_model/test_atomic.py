"""Atomic writes: a failed write leaves the old file and no temporary behind."""

import pytest

from shared_model.atomic import write_atomically, write_text_atomically


def test_a_write_replaces_the_file_and_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "state.json"
    write_text_atomically(path, "first")
    write_text_atomically(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_write_that_fails_halfway_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "ledger.json"
    write_text_atomically(path, "old")

    def crash(out):
        out.write(b"half of the new con")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, crash)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
