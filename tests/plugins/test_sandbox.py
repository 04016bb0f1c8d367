"""The sandbox for model-written code: each hostile class is contained.

Every hostile snippet here is bounded even if containment failed (a handful of sleeping
children, one allocation), so a broken sandbox fails these tests without hurting the
shared machine.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from dare_plugins.benchmarks.sandbox import network_namespace_prefix, run_python


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed child waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dead(pids: list[int], seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# --- ordinary code ---------------------------------------------------------------------------


def test_benign_snippet_passes():
    result = run_python("import json, math\nprint(json.dumps({'pi': round(math.pi, 2)}))\n"
                        "assert sum(range(10)) == 45\n")
    assert result.ok and result.completed and not result.timed_out
    assert result.returncode == 0 and result.reason is None and result.blocked == ()
    assert result.stdout == '{"pi": 3.14}\n'


def test_failing_assert_is_reported():
    result = run_python("def add(a, b):\n    return a - b\n\n"
                        "assert add(2, 2) == 4, 'add is wrong'\n")
    assert not result.ok and not result.completed and not result.timed_out
    assert result.returncode == 1
    assert result.reason == "AssertionError: add is wrong"
    assert 'File "solution.py", line 4' in result.stderr


def test_early_exit_is_ok_but_not_completed():
    for code in ["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"]:
        result = run_python(code)
        assert result.ok and not result.completed


def test_minimal_environment_and_private_work_dir(tmp_path):
    code = ("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\n"
            "open('scratch.txt', 'w').write('mine')\nos.mkdir('sub')\n"
            "open('sub/a', 'w').write('1')\nimport shutil\nshutil.rmtree('sub')\n"
            "print(sys.flags.isolated, sys.flags.no_site)\n")
    result = run_python(code)
    assert result.ok, result.stderr
    cwd, env, flags = result.stdout.splitlines()
    assert "dare-sandbox-" in cwd
    assert eval(env) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
    assert flags == "1 1"
    assert not os.path.exists(cwd)  # deleted afterwards


# --- hostile code ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_infinite_loop_times_out_and_is_killed(code):
    start = time.monotonic()
    result = run_python(code, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.ok and result.returncode is None
    assert result.reason == "timed out after 1s"
    assert elapsed < 1.0 + 1.0, elapsed


FORKS = {
    # at most 20 children, each only sleeping: harmless even if fork were not refused
    "os.fork": ("import os, sys, time\nfor _ in range(20):\n    pid = os.fork()\n"
                "    if pid == 0:\n        print(os.getpid(), flush=True)\n"
                "        time.sleep(30)\n        os._exit(0)\n"),
    # a doubling bomb capped at 2**4 = 16 processes
    "os.fork (doubling)": ("import os, time\nfor _ in range(4):\n    os.fork()\n"
                           "print(os.getpid(), flush=True)\ntime.sleep(30)\n"),
    "subprocess.Popen": "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
    "os.system": "import os\nos.system('sleep 30 &')\n",
    "os.posix_spawn": "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})\n",
    "os.exec": "import os\nos.execv('/bin/sleep', ['sleep', '30'])\n",
    "multiprocessing": ("import multiprocessing, time\n"
                        "multiprocessing.Process(target=time.sleep, args=(30,)).start()\n"),
}


@pytest.mark.parametrize("name", sorted(FORKS))
def test_fork_bomb_is_refused(name):
    result = run_python(FORKS[name], timeout_s=5.0)
    assert not result.ok and not result.timed_out
    assert result.blocked and result.reason.startswith("blocked: "), result.stderr
    event = name.split(" ")[0]
    if event != "multiprocessing":
        assert result.blocked[0].startswith(event), result.blocked
    # no child was ever started: none printed its pid, none is alive
    pids = [int(line) for line in result.stdout.split()]
    assert pids == [] and wait_dead(pids) == []


def test_children_die_with_the_process_group():
    """Without the audit hook, children that were started are killed at the timeout: the
    whole process group goes, so nothing outlives the run (3 sleeping children)."""
    code = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
            "        print(os.getpid(), flush=True)\n        time.sleep(60)\n        os._exit(0)\n"
            "time.sleep(60)\n")
    result = run_python(code, timeout_s=2.0, audit_hook=False)
    assert result.timed_out
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 3
    assert wait_dead(pids) == []


def test_background_child_does_not_outlive_a_normal_exit():
    code = ("import os, time\nif os.fork() == 0:\n    print(os.getpid(), flush=True)\n"
            "    time.sleep(60)\n    os._exit(0)\ntime.sleep(0.5)\n")
    result = run_python(code, timeout_s=5.0, audit_hook=False)
    assert result.ok
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 1 and wait_dead(pids) == []


def test_files_outside_the_work_dir_survive(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inner.txt").write_text("keep me too")
    attempts = [
        f"os.remove({str(canary)!r})",
        f"os.unlink({str(canary)!r})",
        f"pathlib.Path({str(canary)!r}).unlink()",
        f"shutil.rmtree({str(folder)!r})",
        f"os.rmdir({str(folder)!r})",
        f"open({str(canary)!r}, 'w').write('gone')",
        f"open({str(canary)!r}, 'a').write('more')",
        f"os.rename({str(canary)!r}, 'stolen.txt')",
        f"os.truncate({str(canary)!r}, 0)",
        f"os.chmod({str(canary)!r}, 0)",
        f"os.symlink({str(canary)!r}, 'link'); open('link', 'w').write('via link')",
        f"shutil.copyfile('/etc/hostname', {str(canary)!r})",
        f"os.mkdir({str(tmp_path / 'new')!r})",
    ]
    code = "import os, pathlib, shutil\n" + "".join(
        f"try:\n    {a}\n    print('DONE', {a!r})\nexcept PermissionError:\n    pass\n"
        for a in attempts)
    result = run_python(code)
    assert "DONE" not in result.stdout, result.stdout
    assert result.ok, result.stderr  # each attempt was refused with PermissionError
    assert result.stderr.count("sandbox: blocked ") == len(attempts), result.stderr
    assert {b.split(" ")[0] for b in result.blocked} == {  # distinct refusals
        "os.remove", "shutil.rmtree", "os.rmdir", "open", "os.rename", "os.truncate",
        "os.chmod", "shutil.copyfile", "os.mkdir"}
    assert canary.read_text() == "keep me"
    assert (folder / "inner.txt").read_text() == "keep me too"
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt", "folder"]


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.5)
    yield server
    server.close()


def connections(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = server.accept()
        except (socket.timeout, BlockingIOError, OSError):
            return count
        conn.close()
        count += 1


def connect_code(port: int) -> str:
    return (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'hello')\nprint('CONNECTED')\n")


@pytest.mark.parametrize("namespace", [None, False], ids=["default", "audit-hook-only"])
def test_network_is_refused(listener, namespace):
    result = run_python(connect_code(listener.getsockname()[1]), network_namespace=namespace)
    assert not result.ok and "CONNECTED" not in result.stdout
    assert result.blocked and result.blocked[0].startswith("socket."), result.stderr
    assert connections(listener) == 0


def test_network_namespace_alone_has_no_route(listener):
    """The OS layer on its own: without the audit hook, the empty network namespace still
    cannot reach a port that is listening on this machine's loopback."""
    if network_namespace_prefix() is None:
        pytest.skip("`unshare --net` does not work here: the audit hook is the network guard")
    result = run_python(connect_code(listener.getsockname()[1]), audit_hook=False,
                        network_namespace=True)
    assert result.network_namespace
    assert not result.ok and "CONNECTED" not in result.stdout
    assert result.blocked == ()
    assert "Network is unreachable" in result.stderr, result.stderr
    assert connections(listener) == 0


def test_listener_is_reachable_without_any_guard(listener):
    """Control: the same snippet does connect with both guards off, so the two tests above
    really show containment."""
    result = run_python(connect_code(listener.getsockname()[1]), audit_hook=False,
                        network_namespace=False)
    assert result.ok and "CONNECTED" in result.stdout, result.stderr
    assert connections(listener) == 1


@pytest.mark.parametrize("code", ["x = bytearray(1024 * 2**20)\n", "x = [0] * (300 * 2**20)\n",
                                  "x = ' ' * (2 * 2**30)\n"])
def test_memory_bomb_fails(code):
    result = run_python(code, memory_mb=256)
    assert not result.ok and not result.timed_out
    assert result.reason == "memory limit (MemoryError)", result.stderr


def test_memory_under_the_limit_is_fine():
    result = run_python("x = bytearray(64 * 2**20)\nprint(len(x))\n", memory_mb=256)
    assert result.ok and result.stdout == f"{64 * 2**20}\n"


def test_huge_output_is_capped():
    result = run_python("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 2**16)\n",
                        file_mb=1, max_output_chars=1000)
    assert not result.ok  # the 1 MiB file limit stops the 12.5 MiB of output
    assert len(result.stdout) == 1000 and len(result.stderr) <= 1000


@pytest.mark.parametrize("code, event", [
    ("import ctypes\n", "import ctypes"),
    ("import os\nos.kill(1, 0)\n", "os.kill"),
    ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
     "resource.setrlimit"),
    ("import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess\n",
     "import _posixsubprocess"),
    ("import _posixsubprocess\n_posixsubprocess.fork_exec()\n", "_posixsubprocess.fork_exec"),
])
def test_escape_hatches_are_closed(code, event):
    result = run_python(code)
    assert not result.ok and result.blocked and result.blocked[0].startswith(event), result.stderr
