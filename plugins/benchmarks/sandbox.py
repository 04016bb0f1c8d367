"""Run untrusted Python (model-written code) in a contained child process.

``run_python(code, timeout_s=5.0, memory_mb=256) -> Result`` runs ``code`` as the
``__main__`` module of a fresh interpreter and reports how it ended. The layers, from the
outside in:

1. **Process**: ``python -I -B -S`` (isolated mode: no ``PYTHON*`` variables, no user
   site; no bytecode written; no site-packages, so only the standard library imports) with
   a minimal environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = the work directory) in
   its own session (``start_new_session``). On timeout the whole process group is killed
   with ``SIGKILL``; after a normal exit the group is killed too, so a background child
   never outlives the run.
2. **Work directory**: a fresh temporary directory is the child's cwd, ``HOME`` and
   ``TMPDIR``; it (and the runner files beside it) is deleted afterwards.
3. **Network**: when ``unshare --net`` works (root, or ``unshare --map-root-user --net``
   where user namespaces are allowed) the child runs in an empty network namespace: no
   interface but a down loopback, so nothing can be reached, not even 127.0.0.1.
   Probed once per process; otherwise the audit hook below is the only network guard.
4. **Resource limits**, set by the runner in the child before the untrusted code starts
   (``setrlimit``, soft = hard): ``RLIMIT_AS`` (``memory_mb``: an allocation beyond it
   raises ``MemoryError``), ``RLIMIT_CPU`` (the timeout's whole seconds plus two),
   ``RLIMIT_FSIZE`` (``file_mb``: no file, stdout and stderr included, grows beyond it),
   ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` (the user's current task
   count plus ``max_processes``). Limits are applied in the child, not in a
   ``preexec_fn``, because ``preexec_fn`` can deadlock when the caller has threads (Ray
   workers, thread pools). Note: ``RLIMIT_NPROC`` counts every process of the user and is
   **not enforced for root** (the kernel exempts ``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN``),
   which is why process creation is also refused by the audit hook.
5. **Audit hook** (PEP 578, installed by the runner before the untrusted code is even
   compiled): refuses process creation (``os.fork``, ``os.system``, ``os.exec*``,
   ``os.posix_spawn``, ``subprocess.Popen``; ``_posixsubprocess.fork_exec`` is replaced),
   signals to other processes (``os.kill``/``os.killpg``), every ``socket.*`` event,
   ``ctypes`` (so no foreign calls), raising limits (``resource.setrlimit``), the
   ``gc``/frame introspection that could reach the hook, and any file-system change
   outside the work directory: ``open`` for writing, ``os.remove``/``unlink``/``rmdir``/
   ``rename``/``replace``/``mkdir``/``chmod``/``chown``/``link``/``symlink``/``truncate``/
   ``utime``, ``shutil.rmtree``/``copyfile``/``move``... (paths are resolved with symlinks
   followed, ``dir_fd`` through ``/proc/self/fd``). A refused call raises
   ``PermissionError("sandbox: blocked ...")`` and is written to stderr, so
   ``Result.blocked`` lists it even when the code catches the exception.

Reading files outside the work directory stays allowed (the standard library must import).
The audit hook is a guard against accidents and obvious abuse, not a security boundary on
its own (PEP 578 says so); the OS layers above do not depend on it. For adversarial code,
run the evaluator itself in a container or VM as well.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_MARK = "sandbox: blocked "
MAX_OUTPUT_CHARS = 20_000


@dataclass(frozen=True)
class Result:
    """How a sandboxed run ended.

    ok: exited with status 0 within the time limit.
    returncode: the exit status (negative: killed by that signal; None: timed out).
    stdout, stderr: the output (at most ``max_output_chars`` each; stdout keeps its start,
        stderr its end, where tracebacks are).
    timed_out: killed at the wall-clock limit.
    reason: None when ok, else a short cause: ``"timed out after 5.0s"``,
        ``"memory limit (MemoryError)"``, ``"blocked: os.fork"``, ``"AssertionError: ..."``,
        ``"killed by SIGXCPU"``, ``"exit status 3"``.
    blocked: what the audit hook refused during the run, event first (e.g.
        ``("os.fork",)``, ``("os.remove '/etc/passwd'",)``), also when the code caught the
        ``PermissionError``.
    completed: the code ran to its last statement (not ended early by ``sys.exit``,
        ``os._exit``, a signal or an exception): a test script whose code under test exits
        with status 0 before the asserts run is ``ok`` but not ``completed``. (A marker the
        runner writes afterwards; it stops accidental early exits, not code that digs the
        marker out of the runner's frames.)
    duration_s: wall-clock seconds, start to end (including the interpreter's start).
    network_namespace: the run had its own empty network namespace.
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    reason: str | None
    blocked: tuple[str, ...] = ()
    completed: bool = False
    duration_s: float = 0.0
    network_namespace: bool = field(default=False, compare=False)


# --- the runner: executed by the child before the untrusted code ---------------------------

_RUNNER = r'''
import os, sys, resource

def _limits(limits):
    for name, value in limits:
        resource.setrlimit(getattr(resource, name), (value, value))

def _guard(work, mark):
    import os, sys, posixpath
    realpath, fspath, fsdecode = posixpath.realpath, os.fspath, os.fsdecode
    isabs, join, readlink, write = posixpath.isabs, posixpath.join, os.readlink, os.write
    startswith = str.startswith
    prefix = work + "/"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    always = frozenset((
        "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
        "os.startfile", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sys.setprofile", "sys.settrace",
        "os.chroot", "os.setns", "os.unshare", "os.setuid", "os.setgid",
    ))
    denied_imports = frozenset(("ctypes", "_ctypes", "cffi", "_posixsubprocess"))
    # (event, indexes of path arguments, index of their dir_fd or None)
    paths = {
        "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
        "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3),
        "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
        "os.truncate": ((0,), None), "os.chflags": ((0,), None),
        "os.lchflags": ((0,), None), "os.setxattr": ((0,), None),
        "os.removexattr": ((0,), None), "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 2),
        "shutil.rmtree": ((0,), 1), "shutil.copyfile": ((1,), None),
        "shutil.copymode": ((1,), None), "shutil.copystat": ((1,), None),
        "shutil.chown": ((0,), None), "shutil.move": ((0, 1), None),
        "shutil.make_archive": ((0,), None), "shutil.unpack_archive": ((1,), None),
    }

    def inside(path, dir_fd=None):
        if path is None or isinstance(path, int):
            return True  # an already-open descriptor: it was opened under these rules
        path = fsdecode(fspath(path))
        if not isabs(path) and isinstance(dir_fd, int) and dir_fd >= 0:
            path = join(readlink("/proc/self/fd/%d" % dir_fd), path)
        full = realpath(path)
        return full == work or startswith(full, prefix)

    def refuse(what, error=PermissionError):
        write(2, (mark + what + "\n").encode("utf-8", "replace"))
        raise error(mark + what)

    def hook(event, args):
        if event in always or event.startswith(("socket.", "ctypes.")):
            refuse(event)
        if event == "open":
            path, mode, flags = args
            if (flags or 0) & write_flags and not inside(path):
                refuse("open for writing " + repr(path))
        elif event == "import":
            if args[0].partition(".")[0] in denied_imports:
                refuse("import " + args[0], ImportError)  # optional imports fall back
        elif event in paths:
            indexes, fd_index = paths[event]
            dir_fd = args[fd_index] if fd_index is not None and len(args) > fd_index else None
            for i in indexes:
                if i < len(args) and not inside(args[i], dir_fd):
                    refuse(event + " " + repr(args[i]))

    try:  # subprocess calls this without an audit event of its own
        import _posixsubprocess
        def fork_exec(*args, **kwargs):
            refuse("_posixsubprocess.fork_exec")
        _posixsubprocess.fork_exec = fork_exec
    except ImportError:
        pass
    sys.addaudithook(hook)

def _main():
    limits, work, guard, mark, token, done_path = LIMITS, WORK, GUARD, MARK, TOKEN, DONE
    for name in ("LIMITS", "WORK", "GUARD", "MARK", "TOKEN", "DONE"):
        del globals()[name]
    with open(os.path.join(work, "solution.py"), encoding="utf-8") as f:
        source = f.read()
    done = os.open(done_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    _limits(limits)
    if guard:
        _guard(work, mark)
    import types
    main = types.ModuleType("__main__")
    main.__file__ = "solution.py"
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    code = compile(source, "solution.py", "exec")
    del source
    exec(code, main.__dict__)
    os.write(done, token.encode())  # reached only when the code ran to its end

_main()
'''


# --- helpers of the parent -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command prefix that gives a child an empty network namespace here,
    or None when neither ``unshare --net`` (root) nor ``unshare --map-root-user --net``
    works. Probed once per process."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)
    if unshare is None:
        return None
    true = shutil.which("true") or "/bin/true"
    for prefix in ((unshare, "--net", "--"), (unshare, "--map-root-user", "--net", "--")):
        try:
            done = subprocess.run([*prefix, true], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return prefix
    return None


def _user_tasks() -> int | None:
    """Tasks (processes and threads) of this real user: RLIMIT_NPROC counts them all."""
    uid = os.getuid()
    total = 0
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1").split()[0]) == uid:
                total += int(fields.get("Threads", "1").strip() or 1)
    except OSError:
        return None
    return total


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path, limit: int, keep_end: bool) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if keep_end and size > limit * 4:
                f.seek(size - limit * 4)
            data = f.read(limit * 4)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text[-limit:] if keep_end else text[:limit]


def _rmtree(path: Path) -> None:
    def retry(func, target, _exc):  # the code may have removed permissions inside
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        except OSError:
            pass
        try:
            func(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def _reason(returncode: int | None, timed_out: bool, timeout_s: float, stderr: str,
            blocked: tuple[str, ...]) -> str | None:
    if timed_out:
        return f"timed out after {timeout_s:g}s"
    if returncode == 0:
        return None
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if last.startswith("MemoryError"):
        return "memory limit (MemoryError)"
    if blocked and BLOCK_MARK in last:
        return f"blocked: {last.split(BLOCK_MARK, 1)[1][:200]}"
    if last and (":" in last or last.endswith("Error")):
        return last[:300]
    return f"exit status {returncode}"


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, *,
               file_mb: int = 16, max_open_files: int = 64, max_processes: int = 16,
               network_namespace: bool | None = None, audit_hook: bool = True,
               python: str | None = None, max_output_chars: int = MAX_OUTPUT_CHARS) -> Result:
    """Run ``code`` in a fresh contained interpreter; see the module docstring.

    timeout_s: wall-clock limit (the interpreter's start included); the process group is
        killed at it. memory_mb: address-space limit. file_mb: largest file (and output).
    max_processes: ``RLIMIT_NPROC`` head-room over the user's current task count.
    network_namespace: None uses ``unshare --net`` when it works here, True requires it
        (``RuntimeError`` when unavailable), False never uses it.
    audit_hook: False runs without the in-process guard (tests of the OS layers only).
    python: interpreter to run (default ``sys.executable``).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    prefix: tuple[str, ...] = ()
    if network_namespace is not False:
        found = network_namespace_prefix()
        if found is None and network_namespace:
            raise RuntimeError("run_python(network_namespace=True): `unshare --net` does not "
                               "work here (needs root or unprivileged user namespaces)")
        prefix = found or ()

    cpu_s = int(timeout_s) + 2
    limits = [("RLIMIT_AS", memory_mb * 2**20), ("RLIMIT_CPU", cpu_s),
              ("RLIMIT_FSIZE", file_mb * 2**20), ("RLIMIT_NOFILE", max_open_files),
              ("RLIMIT_CORE", 0)]
    tasks = _user_tasks() if os.getuid() != 0 else None  # root: not enforced anyway
    if tasks is not None:
        limits.append(("RLIMIT_NPROC", tasks + max_processes))

    root = Path(tempfile.mkdtemp(prefix="dare-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        work_real = os.path.realpath(work)
        (work / "solution.py").write_text(code, encoding="utf-8")
        token, done_path = secrets.token_hex(16), root / "done"
        header = (f"LIMITS = {limits!r}\nWORK = {work_real!r}\nGUARD = {bool(audit_hook)!r}\n"
                  f"MARK = {BLOCK_MARK!r}\nTOKEN = {token!r}\nDONE = {str(done_path)!r}\n")
        runner = root / "runner.py"
        runner.write_text(header + _RUNNER, encoding="utf-8")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work_real, "TMPDIR": work_real,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        argv = [*prefix, python or sys.executable, "-I", "-B", "-S", str(runner)]
        out_path, err_path = root / "stdout", root / "stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=work_real, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True)
            timed_out = False
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = None
            finally:
                _kill_group(proc.pid)  # the child's session: stragglers and background children
                proc.wait()
        duration = time.monotonic() - start
        stdout = _read(out_path, max_output_chars, keep_end=False)
        stderr = _read(err_path, max_output_chars, keep_end=True)
        blocked = tuple(dict.fromkeys(  # distinct refused events, in order
            line[len(BLOCK_MARK):].strip()
            for line in _read(err_path, 10 * max_output_chars, keep_end=True).splitlines()
            if line.startswith(BLOCK_MARK)))
        try:
            completed = done_path.read_text(encoding="ascii", errors="replace") == token
        except OSError:
            completed = False
        return Result(ok=returncode == 0 and not timed_out, returncode=returncode,
                      stdout=stdout, stderr=stderr, timed_out=timed_out,
                      reason=_reason(returncode, timed_out, timeout_s, stderr, blocked),
                      blocked=blocked, completed=completed, duration_s=duration,
                      network_namespace=bool(prefix))
    finally:
        _rmtree(root)
