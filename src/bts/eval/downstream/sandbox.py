"""Run untrusted, model-written Python (HumanEval completions plus their tests) in a contained child process.

    result = run_python(program_text, timeout=10.0)
    result.passed          # exit status 0 before the deadline

Containment, strongest first; `isolation()` says which layers are active on this machine:
- resource limits set with `resource.setrlimit` in the child before exec: CPU seconds, address space, number of
  processes (stops fork bombs), file size, core dumps, open files;
- a wall-clock deadline after which the whole process group is killed with SIGKILL;
- a fresh temporary working directory (also HOME and TMPDIR), deleted afterwards; an environment holding none of
  the user's variables; `python -I` so PYTHON* variables and user site-packages are ignored;
- where `unshare` works (root, or unprivileged user namespaces): new network and PID namespaces. No network
  interface is up, so nothing can connect anywhere, localhost included; and when the program exits or is killed,
  the kernel kills every process it left behind, even ones that called setsid();
- when running as root (and 'nobody' can start this interpreter): the program runs as uid/gid 65534 ('nobody')
  with no supplementary groups and no capabilities, so nothing that is not world-writable can be changed or
  deleted;
- where no network namespace is available: a preamble replaces socket creation with one that raises. This is a
  best-effort guard only — Python code can undo it.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
_NO_NET_PREAMBLE = '''\
import socket as _s
def _refuse(*a, **k):
    raise OSError("network access is disabled in the bts sandbox")
_s.socket.connect = _s.socket.connect_ex = _s.socket.bind = _refuse
_s.create_connection = _s.getaddrinfo = _refuse
del _s, _refuse
'''


@dataclass
class Limits:
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space; Python itself needs ~30 MB
    processes: int = 32  # new processes/threads the program may start (RLIMIT_NPROC, on top of its uid's count)
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare_prefix(as_root: bool) -> list[str]:
    # --kill-child: if unshare itself dies, its child (PID 1 of the new namespace) is killed, which takes the whole
    # namespace down with it.
    base = [shutil.which("unshare") or "unshare", "--net", "--pid", "--fork", "--kill-child"]
    if not as_root:
        base.insert(1, "--map-root-user")  # an unprivileged user namespace makes the other namespaces possible
    return base


def _drop_prefix() -> list[str]:
    return [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@functools.cache
def isolation() -> dict:
    """Which containment layers work here, probed once per process by actually using them."""
    as_root = os.geteuid() == 0
    env = {"PATH": os.defpath}
    netns = False
    if shutil.which("unshare"):
        probe = subprocess.run([*_unshare_prefix(as_root), sys.executable, "-I", "-c",
                                "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"],
                               capture_output=True, text=True, timeout=60, env=env)
        # In a fresh network namespace loopback is down, so the connect fails with "Network is unreachable".
        netns = probe.returncode != 0 and "unreachable" in probe.stderr.lower()
    drop_uid = False
    if as_root and shutil.which("setpriv"):
        # 'nobody' must be able to start this interpreter and read its stdlib (not so if it lives under a private
        # home such as /root/.pyenv on a stock kernel); otherwise the program keeps running as root.
        probe = subprocess.run([*_drop_prefix(), sys.executable, "-I", "-c", "import json, os; print(os.getuid())"],
                               capture_output=True, text=True, timeout=60, env=env, cwd="/")
        drop_uid = probe.returncode == 0 and probe.stdout.strip() == str(NOBODY)
    return {"network": "namespace" if netns else "socket-patch", "pid_namespace": netns,
            "uid": "nobody" if drop_uid else "unchanged", "rlimits": True}


def _command(script: Path) -> list[str]:
    iso = isolation()
    as_root = os.geteuid() == 0
    cmd = []
    if iso["network"] == "namespace":
        cmd += _unshare_prefix(as_root)
    if iso["uid"] == "nobody":
        cmd += _drop_prefix()
    return cmd + [sys.executable, "-I", str(script)]


def _tasks_of(uid: int) -> int:
    """Processes and threads the kernel already counts against uid's RLIMIT_NPROC."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip())
    return total


def _set_limits(limits: Limits, uid: int):
    # RLIMIT_NPROC caps all tasks of the uid, not just the sandbox's: allow what that uid already runs (this very
    # process and its threads, when it is not dropped to 'nobody') plus the sandbox's own budget.
    nproc = _tasks_of(uid) + limits.processes

    def apply():  # runs in the child between fork and exec: only plain syscalls here
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                             (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, limits.file_bytes),
                             (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(program: str, timeout: float = 10.0, limits: Limits | None = None) -> SandboxResult:
    """Run `program` as a Python script in the sandbox; "passed" means it exited with status 0 in time."""
    limits = limits or Limits(cpu_seconds=max(1, int(timeout) + 1))
    iso = isolation()
    work = Path(tempfile.mkdtemp(prefix="bts-sandbox-"))
    try:
        script = work / "program.py"
        preamble = _NO_NET_PREAMBLE if iso["network"] != "namespace" else ""
        script.write_text(preamble + program, encoding="utf-8")
        if iso["uid"] == "nobody":
            os.chown(work, NOBODY, NOBODY)  # the program's only writable place
            os.chown(script, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        # Output goes to unnamed files, not pipes: a stray grandchild holding a pipe open cannot stall us.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(_command(script), cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True,
                                    preexec_fn=_set_limits(limits, NOBODY if iso["uid"] == "nobody" else os.getuid()))
            try:
                returncode = proc.wait(timeout=timeout)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                _kill_group(proc.pid)  # leftovers in the group (the PID namespace, if any, is already gone)
                proc.wait()
            seconds = time.monotonic() - start
            out.seek(0), err.seek(0)
            stdout = out.read(1 << 20).decode("utf-8", "replace")
            stderr = err.read(1 << 20).decode("utf-8", "replace")
        return SandboxResult(status, returncode, stdout, stderr, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs for one sample: the function, its test suite, and the call to `check`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
