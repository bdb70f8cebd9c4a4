"""What every command shares (`runtime/console.py`), in real processes: the extra check, quiet third-party logs,
signals turned into a clean exit that runs cleanup, progress bars only on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
import types
from pathlib import Path

import pytest

from conftest import default_sigint
from llava_rt.runtime.console import MissingExtra, require_extra

# A command built on run_command, run as `python -m` (as `python -m llava_rt.export.cli` is): `--log` logs INFO
# and WARNING from a third-party logger created after the logging is configured; `--wait FILE` writes FILE and
# sleeps, its cleanup prints "cleaned up"; with `--in-eval` it waits inside a string `eval` (as sympy's run under
# torch.export), with `--mangle` the interrupt comes out as a TypeError (as torch's argument parser reports it).
COMMAND = """
import argparse, logging, sys, time
from pathlib import Path
from llava_rt.runtime.console import add_standard_options, progress, run_command, say

def wait(path):
    try:
        Path(path).write_text("started")
        time.sleep(60)
    finally:
        print("cleaned up", file=sys.stderr)

def body(args):
    if args.log:
        logging.getLogger("somelib.module").info("an info line")
        logging.getLogger("somelib.module").warning("a warning line")
    if args.bar:
        bar = progress(total=2, desc="stages", unit="stage")
        say("first stage")
        bar.update()
        bar.close()
    if args.wait and args.in_eval:
        eval("wait(args.wait)")
    elif args.wait and args.mangle:
        try:
            wait(args.wait)
        except KeyboardInterrupt as exc:
            raise TypeError(f"argument failed to unpack with error {exc!r}") from None
    elif args.wait:
        wait(args.wait)
    return 0

parser = argparse.ArgumentParser(prog="demo-command")
parser.add_argument("--log", action="store_true")
parser.add_argument("--bar", action="store_true")
parser.add_argument("--wait")
parser.add_argument("--in-eval", action="store_true")
parser.add_argument("--mangle", action="store_true")
sys.exit(run_command(add_standard_options(parser), body))
"""


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo_command")
    (directory / "demo_command.py").write_text(COMMAND)
    return directory


def command(module_dir: Path, *args: str, preexec_fn=default_sigint, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "demo_command", *args], cwd=module_dir, text=True, preexec_fn=preexec_fn, **options
    )


def started_command(module_dir: Path, *args: str, **options) -> subprocess.Popen:
    """`command(--wait ...)`, once it is waiting."""
    started = module_dir / f"started-{time.monotonic_ns()}"
    process = command(module_dir, "--wait", str(started), *args, stderr=subprocess.PIPE, **options)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), process.communicate(timeout=60)[1]
    return process


def test_a_blocked_module_and_a_module_without_spec_count_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "blocked_module", None)
    monkeypatch.setitem(sys.modules, "specless_module", types.ModuleType("specless_module"))  # __spec__ is None
    with pytest.raises(MissingExtra, match=r'\(blocked_module, specless_module not installed\): pip install "llava-rt\[x\]"'):
        require_extra("x", ["json", "blocked_module", "specless_module"])
    require_extra("x", ["json"])


def test_third_party_info_logs_only_with_verbose(module_dir):
    quiet = command(module_dir, "--log", stderr=subprocess.PIPE).communicate(timeout=60)[1]
    assert "a warning line" in quiet and "an info line" not in quiet
    verbose = command(module_dir, "--log", "--verbose", stderr=subprocess.PIPE).communicate(timeout=60)[1]
    assert "an info line" in verbose and "somelib.module" in verbose


@pytest.mark.parametrize("way", [(), ("--in-eval",), ("--mangle",)], ids=["plain", "in-eval", "mangled"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_runs_cleanup_and_exits_130(module_dir, signum, way):
    """Also when the interrupt left a string `eval` (CPython would end the process with SIGINT, status -2, if it
    were exactly a KeyboardInterrupt) or came out as another exception."""
    process = started_command(module_dir, *way)
    process.send_signal(signum)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line] == ["cleaned up", "demo-command: interrupted"]


def test_a_signal_ignored_at_start_stays_ignored(module_dir):
    """`nohup llava-export ...`: the terminal's hangup does not stop the command; SIGTERM still does."""
    process = started_command(module_dir, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    process.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130


def _stderr_on_a_terminal(module_dir: Path, *args: str) -> str:
    """Run the command with stderr on a pseudo-terminal of 100 columns; what it drew there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    process = command(module_dir, *args, stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_nothing_otherwise(module_dir):
    drawn = _stderr_on_a_terminal(module_dir, "--bar")
    assert "stages:" in drawn and "0/2" in drawn and "first stage" in drawn
    piped = command(module_dir, "--bar", stderr=subprocess.PIPE).communicate(timeout=60)[1]
    assert piped.splitlines() == ["first stage"]


def test_a_reader_closing_stdout_ends_the_command_quietly():
    """`llava-run ... | head -1`: the writer stops without a BrokenPipeError traceback."""
    script = (
        "import argparse, sys\n"
        "from llava_rt.runtime.console import run_command\n"
        "def body(args):\n"
        "    for i in range(10**6):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "sys.exit(run_command(argparse.ArgumentParser(prog='demo'), body, []))\n"
    )
    result = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "$0" | head -1; exit "${{PIPESTATUS[0]}}"', script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "line 0\n"
    assert result.returncode == 141 and result.stderr == "", result.stderr
