"""One-paragraph errors on the console: expected errors print `prog: error: ...` and exit 2; --debug shows more."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shared_model.catalog import CatalogError
from shared_model.console import console_command, describe_error, exit_on_error, run_command, take_debug_flag
from shared_model.events import EventsError
from shared_model.recommend import main as recommend_main


def _fail(err: Exception):
    """A command main that raises `err`."""
    def main() -> int:
        raise err
    return main


@pytest.mark.parametrize("err", [EventsError("/data/e.csv", "unparsable timestamp 'x'", row=3, column="timestamp"),
                                 CatalogError("/m/catalog.json: 'item_ids' is empty"),
                                 FileNotFoundError("/m: not a model directory"), ValueError("lr must be > 0")])
def test_expected_error_is_one_paragraph_and_exit_code_2(err, capsys, monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    assert run_command("fedrec-x", _fail(err), argv=[]) == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"fedrec-x: error: {err}")
    assert printed.count("\n") == 1 and "Traceback" not in printed
    assert "--debug" in printed  # says how to get the traceback


@pytest.mark.parametrize(("argv", "env"), [(["--debug"], None), ([], "1")])
def test_debug_flag_or_env_prints_the_traceback_too(argv, env, capsys, monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    if env:
        monkeypatch.setenv("FEDREC_DEBUG", env)
    assert run_command("fedrec-x", _fail(ValueError("bad")), argv=argv) == 2
    printed = capsys.readouterr().err
    assert "Traceback (most recent call last)" in printed
    assert printed.rstrip().endswith("fedrec-x: error: bad")


def test_unexpected_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command("fedrec-x", _fail(ZeroDivisionError("a bug")), argv=[])


def test_multi_line_message_is_joined_into_one_paragraph():
    assert describe_error("p", ValueError("first\n\n  second\n"), debug=True) == "p: error: first second"


def test_success_returns_mains_code():
    assert run_command("fedrec-x", lambda: None, argv=[]) == 0
    assert run_command("fedrec-x", lambda: 3, argv=[]) == 3


def test_exit_on_error_raises_system_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    with pytest.raises(SystemExit) as caught:
        exit_on_error("fedrec-simulate", _fail(EventsError("e.csv", "file is empty")))
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("fedrec-simulate: error: e.csv: file is empty")


def test_console_command_takes_debug_out_of_argv(monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    seen: list[list[str]] = []
    monkeypatch.setattr(sys, "argv", ["fedrec-x", "data=events", "--debug"])
    entry = console_command("fedrec-x", lambda: seen.append(list(sys.argv)))
    with pytest.raises(SystemExit) as caught:
        entry()
    assert caught.value.code == 0
    assert seen == [["fedrec-x", "data=events"]]  # Hydra never sees --debug
    assert os.environ["FEDREC_DEBUG"] == "1"


def test_take_debug_flag_without_the_flag_changes_nothing(monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    argv = ["a", "b"]
    assert not take_debug_flag(argv)
    assert argv == ["a", "b"]


def test_recommend_missing_model_dir_is_one_paragraph(tmp_path: Path, capsys, monkeypatch):
    # Before: a FileNotFoundError traceback.
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    assert recommend_main([str(tmp_path / "nope"), "i1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedrec-recommend: error: {tmp_path / 'nope'}: not a model directory")
    assert "Traceback" not in err


def test_recommend_broken_catalog_is_one_paragraph(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("FEDREC_DEBUG", raising=False)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "catalog.json").write_text('{"item_ids": [1, 2]}')
    assert recommend_main([str(tmp_path), "i1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().endswith(f"fedrec-recommend: error: {tmp_path / 'catalog.json'}: item_ids[0] must be a "
                                 "string, found number 1")


def test_recommend_refuses_unknown_event_type_as_a_usage_error(tmp_path: Path, capsys):
    # Before: a KeyError traceback from the event-type lookup.
    with pytest.raises(SystemExit) as caught:
        recommend_main([str(tmp_path), "i1", "--event-types", "wishlist"])
    assert caught.value.code == 2
    assert "invalid choice: 'wishlist'" in capsys.readouterr().err
