"""What every llava-rt command shares: `--version` and `--verbose`, the check that its extra is installed,
one-line errors with exit status 2, a clean exit on Ctrl-C or SIGTERM, and progress bars on a terminal."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence

from .. import __version__
from .errors import LlavaRtError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe


class MissingExtra(LlavaRtError):
    """A command needs an optional extra that is not installed."""


def one_line(message: object) -> str:
    """A message on one line: line breaks (in a file name, say) and other control characters are escaped."""
    text = str(message)
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def _importable(name: str) -> bool:
    """Whether `name` can be imported, without importing it. A `None` entry in `sys.modules` (a module blocked on
    purpose) and a module without a spec count as missing; a dotted name whose parent fails to import too."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, modules: Sequence[str]) -> None:
    """Raise `MissingExtra` naming `pip install "llava-rt[extra]"` when one of `modules` cannot be imported."""
    missing = [name for name in modules if not _importable(name)]
    if missing:
        raise MissingExtra(
            f'this command needs the {extra!r} extra ({", ".join(missing)} not installed): pip install "llava-rt[{extra}]"'
        )


def add_standard_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--version`, and `--verbose` (third-party libraries' INFO logs; without it they stay at WARNING)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show the INFO logs of the libraries llava-rt uses")
    return parser


class _OneLineFormatter(logging.Formatter):
    """`prog: warning: message` for llava-rt's own records, `prog: warning: logger: message` for others'."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        origin = "" if record.name.split(".")[0] == "llava_rt" else f"{record.name}: "
        return f"{self.prog}: {record.levelname.lower()}: {origin}{one_line(record.getMessage())}"


def _configure_logging(prog: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(prog))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)
    if not verbose:
        for name in list(logging.root.manager.loggerDict):
            logging.getLogger(name).setLevel(logging.WARNING)


class Interrupted(KeyboardInterrupt):
    """What Ctrl-C raises inside a command (SIGTERM and SIGHUP: `Terminated`). A subclass on purpose: when exactly
    `KeyboardInterrupt` leaves a string `eval` (sympy's, under torch.export), CPython later ends a `python -m`
    process with SIGINT, whatever status the command returned."""


class Terminated(Interrupted):
    """What SIGTERM and SIGHUP raise: the process is asked to end, so a loop that takes Ctrl-C as "stop this answer"
    (`llava-run --interactive`) lets it through."""


def run_command(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    extra: tuple[str, Sequence[str]] | None = None,
) -> int:
    """Parse `argv`, check the extra (`(name, modules)`), run `body(args)` and turn every expected failure into
    one line on stderr: `LlavaRtError` exits 2; Ctrl-C, SIGTERM and SIGHUP exit 130 (through `Interrupted` and
    `Terminated`, `KeyboardInterrupt`s, so `finally` blocks and temporary-directory cleanup run); a closed stdout
    exits 141 silently."""
    prog = parser.prog
    args = parser.parse_args(argv)
    _configure_logging(prog, getattr(args, "verbose", False))
    received: list[int] = []

    def interrupt(signum, frame) -> None:
        received.append(signum)
        raise Interrupted if signum == signal.SIGINT else Terminated

    previous = {}
    if threading.current_thread() is threading.main_thread():  # a signal ignored on purpose (`nohup`, `cmd &`) stays so
        caught = [sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) != signal.SIG_IGN]
        previous = {sig: signal.signal(sig, interrupt) for sig in caught}
    try:
        if extra is not None:
            require_extra(*extra)
        return body(args)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is silent
        return EXIT_BROKEN_PIPE
    except BaseException as exc:
        # after a signal, whatever ended the body is the interruption: a library may have turned it into its own
        # error (torch's argument parser reports a TypeError, which the export reports as a failed graph)
        if received or isinstance(exc, KeyboardInterrupt):
            print(f"\n{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(exc, LlavaRtError):
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def say(message: str) -> None:
    """Print a line on stderr above any progress bar being drawn there (a plain print would cut through it)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def progress(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None, unit: str = "it", enabled: bool = True
):
    """A tqdm progress bar on stderr when `enabled` and stderr is a terminal; nothing otherwise."""
    from tqdm import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not shown, leave=False)
