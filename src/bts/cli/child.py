"""`bts <argv>` in a forked child process: the real CLI entry point, for the crash and bad-input tests.

The child reuses this interpreter's imports, so it starts in milliseconds instead of paying a fresh interpreter.
"""

from __future__ import annotations

import os
import signal

from bts.faults import ENV


def run_cli(argv: list[str], log_path, fault: str | None = None, timeout: float = 300.0) -> int:
    """Run `bts <argv>` in a forked child (this interpreter's imports are reused, so it starts in milliseconds)
    with BTS_FAULT_AT=fault; stdout and stderr go to log_path. Returns the exit code, or -signal when the child
    was killed (-9 when the fault fired). A child still running after `timeout` seconds is killed and the
    call raises TimeoutError."""
    import sys
    import time
    import traceback

    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 70
        try:
            with open(log_path, "w") as log:
                sys.stdout = sys.stderr = log
                if fault:
                    os.environ[ENV] = fault
                else:
                    os.environ.pop(ENV, None)
                try:
                    from bts.cli import main

                    code = main(argv)
                except SystemExit as exc:  # argparse errors
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # a bug: keep the traceback, as `python -m bts` would
                    traceback.print_exc()
                    code = 1
                log.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"bts {' '.join(argv)} ran past {timeout} s")
        time.sleep(0.02)
