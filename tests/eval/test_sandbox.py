"""The sandbox that runs model-written code: each test is an attack that must not reach the host."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bts.eval.downstream import sandbox
from bts.eval.downstream.sandbox import humaneval_program, isolation, run_python

IS_ROOT = os.geteuid() == 0


def test_root_gets_full_isolation():
    if not IS_ROOT:
        pytest.skip("uid and namespace isolation are only guaranteed when running as root")
    assert isolation() == {"network": "namespace", "pid_namespace": True, "uid": "nobody", "rlimits": True}


def test_correct_completion_passes_and_wrong_one_fails():
    prompt = "def add(a, b):\n"
    test = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"
    assert run_python(humaneval_program(prompt, "    return a + b\n", test, "add")).passed
    wrong = run_python(humaneval_program(prompt, "    return a - b\n", test, "add"))
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_environment_is_stripped_and_workdir_removed(monkeypatch):
    monkeypatch.setenv("BTS_SECRET_TOKEN", "hunter2")
    r = run_python("import os, json; print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))")
    import json

    seen = json.loads(r.stdout)
    assert "BTS_SECRET_TOKEN" not in seen["env"]
    assert seen["env"]["HOME"] == seen["cwd"]
    assert not os.path.exists(seen["cwd"])


def test_infinite_loop_is_killed_at_the_deadline():
    r = run_python("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and r.seconds < 5


def test_sleeping_program_is_killed_by_wall_clock():
    # CPU limits cannot catch a sleeper: only the wall-clock deadline can.
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(60)\n", timeout=1.0)
    assert r.status == "timeout" and time.monotonic() - start < 5


def _processes_of(uid: int) -> int:
    return sum(1 for p in os.listdir("/proc") if p.isdigit() and _uid_of(p) == uid)


def _settles_to(uid: int, count: int) -> bool:
    """No more processes of `uid` than before survive. The kernel reaps a torn-down PID namespace
    asynchronously, so allow it a moment; processes of that uid that existed before may end meanwhile."""
    deadline = time.monotonic() + 5
    while _processes_of(uid) > count and time.monotonic() < deadline:
        time.sleep(0.05)
    return _processes_of(uid) <= count


def _uid_of(pid: str):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def test_fork_bomb_is_contained():
    uid = sandbox.NOBODY if isolation()["uid"] == "nobody" else os.getuid()
    before = _processes_of(uid) if uid != os.getuid() else None
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_python(bomb, timeout=2.0)
    assert r.status == "timeout" and time.monotonic() - start < 8
    if before is not None:  # every forked child died with the sandbox's PID namespace
        assert _settles_to(uid, before)
    # and the host can still start processes
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


def test_orphan_that_escapes_the_process_group_dies_too():
    if not (isolation()["pid_namespace"] and isolation()["uid"] == "nobody"):
        pytest.skip("without a PID namespace a setsid() orphan can outlive the sandbox")
    before = _processes_of(sandbox.NOBODY)
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
    assert run_python(program, timeout=5).passed
    assert _settles_to(sandbox.NOBODY, before)


def test_cannot_delete_a_file_outside_the_sandbox():
    if isolation()["uid"] != "nobody":
        pytest.skip("without dropping to another uid the program can delete what the user can")
    with tempfile.TemporaryDirectory() as folder:  # not pytest's tmp_path: its parents are private (0700)
        _attack_file(Path(folder))


def _attack_file(tmp_path):
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.chmod(target, 0o644)
    program = (f"import os, shutil\nprint(open({str(target)!r}).read())\n"
               f"try:\n    os.remove({str(target)!r})\nexcept OSError as e:\n    print('refused', e)\n"
               f"shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
               f"open({str(target)!r}, 'w').write('overwritten')\n")
    r = run_python(program)
    assert "keep me" in r.stdout and "refused" in r.stdout  # readable, not removable
    assert r.status == "failed"  # the final overwrite raised PermissionError
    assert target.read_text() == "keep me"


def _listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    return server


def _assert_no_connection(server, result):
    try:
        conn, _ = server.accept()
        conn.close()
        pytest.fail("the sandboxed program reached a socket on the host")
    except socket.timeout:
        pass
    finally:
        server.close()
    assert result.status == "failed"


def test_network_access_is_refused():
    server = _listener()
    port = server.getsockname()[1]
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n")
    _assert_no_connection(server, r)


def test_socket_patch_fallback_refuses_connections(monkeypatch):
    # Machines without namespaces fall back to a socket preamble; exercise that path explicitly.
    monkeypatch.setattr(sandbox, "isolation",
                        lambda: {"network": "socket-patch", "pid_namespace": False, "uid": "unchanged", "rlimits": True})
    server = _listener()
    port = server.getsockname()[1]
    r = run_python(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
    _assert_no_connection(server, r)
    assert "network access is disabled" in r.stderr


def test_memory_bomb_is_stopped():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n", timeout=10)
    assert r.status == "failed" and "MemoryError" in r.stderr and r.seconds < 10


def test_huge_file_write_is_stopped():
    r = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n", timeout=10)
    assert r.status == "failed"
