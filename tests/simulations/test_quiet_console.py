"""The quiet console: each line once, Flower's chatter and the library notices a user cannot act on kept off
the console (still in the run's log file), one short line per round."""

import logging
import subprocess
import sys
import warnings

from flwr.common.logger import console_handler as flower_console_handler

from shared_model.console import LIBRARY_NOISE, quiet_library_warnings
from simulations.console import ConsoleFilter, quiet_console


def record(name, level, msg, *args):
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_console_keeps_fedrecs_lines_and_flowers_warnings_only():
    keep = ConsoleFilter().filter
    assert keep(record("fedrec.progress", logging.INFO, "round 1/5: 4 sites answered"))
    assert keep(record("simulations.simulate", logging.INFO, "report: x"))
    assert keep(record("flwr", logging.WARNING, "a site failed"))
    assert not keep(record("flwr", logging.INFO, "configure_train: Sampled 4 nodes"))
    assert not keep(record("flwr", logging.DEBUG, "Using InMemoryLinkState"))
    assert not keep(record("flwr", logging.WARNING, "DEPRECATED FEATURE: The `run_simulation` function is deprecated"))
    assert not keep(record("fl_server.server_app", logging.INFO, "round %s", '{"round": 1}'))  # metrics.jsonl has it
    assert keep(record("fl_server.server_app", logging.INFO, "central evaluation of %d users", 5))


def test_quiet_console_drops_flowers_second_handler_and_filters_the_console_not_the_file(tmp_path):
    root, flower = logging.getLogger(), logging.getLogger("flwr")
    console, file = logging.StreamHandler(), logging.FileHandler(tmp_path / "run.log")
    root.addHandler(console)
    root.addHandler(file)
    try:
        quiet_console()
        assert flower_console_handler not in flower.handlers  # each Flower line once, through Hydra's handlers
        assert any(isinstance(f, ConsoleFilter) for f in console.filters) and not file.filters
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()
        flower.addHandler(flower_console_handler)


def test_library_notices_a_user_cannot_act_on_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        for message, _ in LIBRARY_NOISE:
            warnings.warn(f"{message}. More words.", UserWarning, stacklevel=1)
        warnings.warn("something a user can act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user can act on"]


def test_the_server_app_loads_the_title_encoder_without_a_progress_bar():
    """The ServerApp (deployment: its own process, its log the operator's) encodes item titles with transformers,
    whose weight-loading bar is noise to an operator; it showed before the ServerApp quieted its libraries."""
    code = ("import fl_server.server_app\nfrom shared_model.text import encode_texts\n"
            "print(tuple(encode_texts(['a title']).shape))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("(1, 384)")
    assert "Loading weights" not in done.stderr + done.stdout
