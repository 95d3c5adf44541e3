"""A quiet console for the Hydra commands: each line once, Flower's own chatter and the library notices a user
cannot act on only in the run directory's log file, and one short line per federated round."""

from __future__ import annotations

import logging

from flwr.common.logger import console_handler as flower_console_handler

from shared_model.console import quiet_library_warnings

# Flower's simulation entry point is deprecated in favour of `flwr run`, which cannot pass fedrec's in-process
# settings (Hydra's typed config) to the apps; the notice is for Flower's users, not fedrec's.
FLOWER_NOTICES = ("The `run_simulation` function is deprecated",)
# The ServerApp's full round row (JSON): in metrics.jsonl and the log file; the console gets fedrec.progress's line.
FULL_ROWS = (("fl_server.server_app", "round %s"),)


class ConsoleFilter(logging.Filter):
    """Keeps off the console: Flower's records below WARNING, its FLOWER_NOTICES, and FULL_ROWS."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "flwr" or record.name.startswith("flwr."):
            return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in FLOWER_NOTICES)
        return (record.name, record.msg) not in FULL_ROWS


def quiet_console() -> None:
    """Call once Hydra has set up logging: Flower's own console handler goes (its records still reach Hydra's
    console, filtered, and the log file, whole), and LIBRARY_NOISE is silenced."""
    quiet_library_warnings()
    logging.getLogger("flwr").removeHandler(flower_console_handler)
    consoles = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
