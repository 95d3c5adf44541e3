"""One-paragraph errors for fedrec's commands: `fedrec-x: error: ...`, the traceback only with --debug.

Apply it in one call. A plain `main(argv) -> int` returns `run_command("fedrec-x", lambda: _main(argv), argv)`
(and lets argparse accept --debug); a script entry point that cannot take --debug itself (Hydra, or an argparse
main left as it is) becomes `cli = console_command("fedrec-x", main)` with `[project.scripts]` naming `module:cli`.
Hydra catches errors inside its task function, so that body also runs through `exit_on_error`.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

# Library warnings a fedrec user cannot act on, silenced by their message (quiet_library_warnings), with why.
LIBRARY_NOISE: tuple[tuple[str, str], ...] = (
    ("Optimal order is the largest alpha", "Opacus' PRV accountant bounds its search domain with RDP orders; the "
                                           "ε it reports does not depend on them"),
    ("Full backward hook is firing when gradients are computed with respect to module outputs",
     "Opacus' hooks on a model whose inputs (item ids) need no gradient: per-user gradients are unaffected"),
    ("Secure RNG turned off", "Opacus' own secure RNG; fedrec's is privacy.secure_mode / --secure-mode "
                              "(fl_client.dp.secure_rng), stated in fedrec's own log lines"),
    ("Tip: In future versions of Ray, Ray will no longer override accelerator", "a coming Ray default that "
                                                                                "fedrec does not rely on"),
)
DEBUG_FLAG = "--debug"
DEBUG_ENV = "FEDREC_DEBUG"
EXIT_ERROR = 2  # argparse's code for a usage error: the user can fix the input and rerun
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
# Errors a user can act on from the message alone: bad files and settings (EventsError, CatalogError and the other
# ValueErrors), missing or unreadable paths (OSError). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """True when --debug is among the arguments (default sys.argv) or FEDREC_DEBUG=1 is set."""
    args = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def describe_error(prog: str, err: BaseException, debug: bool = False) -> str:
    """`prog: error: message` as one paragraph (lines joined), with a pointer to --debug unless it is on."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = " ".join(lines) or type(err).__name__
    hint = "" if debug else f" (rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)"
    return f"{prog}: error: {message}{hint}"


def run_command(prog: str, main: Callable[[], int | None], argv: Sequence[str] | None = None,
                expected: tuple[type[Exception], ...] = EXPECTED_ERRORS) -> int:
    """Call `main` and return its exit code; an `expected` error is printed as one paragraph and returns 2."""
    debug = debug_enabled(argv)
    try:
        return int(main() or 0)
    except expected as err:
        if debug:
            traceback.print_exc()
        print(describe_error(prog, err, debug), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_on_error(prog: str, main: Callable[[], object],
                  expected: tuple[type[Exception], ...] = EXPECTED_ERRORS) -> None:
    """Run `main`; on an expected error print one paragraph and raise SystemExit(2) (Hydra lets that through)."""

    def call() -> int:
        main()
        return 0

    code = run_command(prog, call, expected=expected)
    if code:
        raise SystemExit(code)


def take_debug_flag(argv: list[str]) -> bool:
    """Remove every --debug from `argv` in place (Hydra refuses unknown flags), recording it in FEDREC_DEBUG."""
    found = DEBUG_FLAG in argv
    argv[:] = [arg for arg in argv if arg != DEBUG_FLAG]
    if found:
        os.environ[DEBUG_ENV] = "1"
    return found


def console_command(prog: str, main: Callable[[], int | None],
                    expected: tuple[type[Exception], ...] = EXPECTED_ERRORS) -> Callable[[], None]:
    """A `[project.scripts]` entry point: takes --debug out of sys.argv, runs `main`, exits with its code."""

    def entry() -> None:
        take_debug_flag(sys.argv)
        sys.exit(run_command(prog, main, expected=expected))

    entry.__doc__ = f"`{prog}` with one-paragraph errors (see shared_model.console)."
    return entry


def quiet_library_warnings() -> None:
    """Silence LIBRARY_NOISE and huggingface_hub's progress bars (which transformers reads when it is imported,
    to load the text encoder) in this process: each command's console keeps only what its user can act on."""
    for message, _why in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message))
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def rng_note(secure_mode: bool) -> str:
    """What DP's randomness comes from, in fedrec's words (Opacus' own notice about its secure RNG is silenced)."""
    if secure_mode:
        return "DP sampling and noise from the OS CSPRNG (secure mode)"
    return ("DP sampling and noise from torch's fast generator: fine for experiments; use secure mode "
            "(privacy.secure_mode=true, fedrec-client --secure-mode) in production")
