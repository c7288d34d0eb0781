"""Run model-written code safely: one throwaway child process per program, never the pytest process.

Public entry points: :func:`run_check` (one program) and :func:`run_checks` (many, bounded parallelism),
both returning :class:`CheckResult`. The threat model and the layers are described in ``docs/sandbox.md``.

The same file is also the harness that runs inside the child (``python -I -S sandbox.py CFG_FD RESULT_FD``),
so the harness half below imports nothing but the standard library, and lazily.

Process layout on Linux with namespaces (root, or an unprivileged user where user namespaces are allowed)::

    pytest thread --Popen--> P0 harness: reads config, unshares mount/pid/net/ipc/uts namespaces,
                             builds a private root (tmpfs + read-only binds), chroots, forks
                             P1 pid 1 of the new pid namespace: mounts /proc, forks, reaps, exits
                                -> the kernel then kills every process left in the namespace
                             P2 sets rlimits, drops to a fresh uid (or drops capabilities), closes
                                fds, runs the program on its main thread; a verdict thread that runs no
                                Python code proves completion on the result fd

Without namespaces P0 itself becomes P2, and cleanup falls back to the process group and, as root, to
killing every process of the per-run uid.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

# Result-channel protocol (harness -> parent), one write each: "INFO {json}\n" + "READY\n" before the
# program starts (trusted: no model code has run yet); afterwards only the exact nonce means "ran to the
# end". Anything else after READY is at best a failure reason, since the program can write there too.
_READY = b"READY\n"
# How long the harness waits, after the last line, for the verdict thread to write the nonce and end the
# process (it takes well under a millisecond unless a thread of the program holds the interpreter lock).
_VERDICT_WAIT = 10.0
_EXIT_SETUP = 70
_EXIT_FAILED = 1
_EXIT_TAMPER = 86
# Each run gets its own uid in this range (as root): nothing on the host owns it, RLIMIT_NPROC counts only
# that run's processes, and "kill every process of this uid" cannot hit anything else.
_UID_BASE = 1_900_000_000
_UID_SPAN = 100_000_000

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38

# Audit events no benchmark solution needs and that reach the harness's memory or rewrite execution
# (skipping asserts with a trace function). Hitting one ends the program as a failure on the spot:
# raising instead would hand the program a traceback into the hook's frame.
_TRIPWIRE_EVENTS = frozenset(
    {
        "sys.settrace",
        "sys.setprofile",
        "sys._current_frames",
        "sys._current_exceptions",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys.monitoring.register_callback",
        "sys.monitoring.set_events",
    }
)


# ----------------------------------------------------------------------------------------------------
# Harness half: runs in the child, standard library only.
# ----------------------------------------------------------------------------------------------------


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _checked(libc, result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    _checked(libc, libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind(libc, source: str, target: str, *, readonly: bool = True) -> None:
    """Bind ``source`` at ``target``, then remount it nosuid/nodev (and read-only)."""
    _mount(libc, source, target, None, _MS_BIND | _MS_REC)
    flags = _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | (_MS_RDONLY if readonly else 0)
    # In a user namespace a remount must keep the flags the source mount has locked (noexec, for one).
    if os.statvfs(source).f_flag & os.ST_NOEXEC:
        flags |= _MS_NOEXEC
    _mount(libc, None, target, None, flags)


def _unshare(libc, notes: list[str]) -> int:
    """Enter as many new namespaces as the OS allows; returns the flags that took effect."""
    root = os.geteuid() == 0
    full = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    for flags in (full, _CLONE_NEWNET):
        flags |= 0 if root else _CLONE_NEWUSER
        if libc.unshare(flags) == 0:
            break
        import ctypes

        notes.append(f"unshare({flags:#x}) failed: {os.strerror(ctypes.get_errno())}")
    else:
        return 0
    if flags & _CLONE_NEWUSER:
        # Map our own ids onto themselves: the program keeps a non-root identity inside the namespace.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    return flags


def _build_root(libc, cfg: dict) -> None:
    """Replace the file system view with a small private root and chroot into it.

    The new root is a size-limited tmpfs mounted over the (empty) working directory: read-only binds of the
    system and interpreter directories, a synthetic /etc, a few device nodes, and writable /tmp and
    /sandbox (the program's cwd). Home directories, the repository and the rest of /etc are not there.
    """
    new_root = os.getcwd()
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount(libc, "tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={cfg['disk_mb']}m,mode=755")
    os.chdir(new_root)  # the old cwd is the directory underneath the tmpfs

    def inside(path: str) -> str:
        return os.path.join(new_root, path.lstrip("/"))

    bound: list[str] = []
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    wanted += [sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    for path in wanted:
        path = os.path.realpath(path) if path not in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") else path
        if any(path == done or path.startswith(done + "/") for done in bound) or not os.path.lexists(path):
            continue
        if os.path.islink(path):  # merged-/usr systems: /bin -> usr/bin
            os.symlink(os.readlink(path), inside(path))
            continue
        os.makedirs(inside(path), exist_ok=True)
        _bind(libc, path, inside(path))
        bound.append(path)

    os.makedirs(inside("/etc"))
    for name in ("ld.so.cache", "ld.so.conf"):
        if os.path.isfile(f"/etc/{name}"):
            open(inside(f"/etc/{name}"), "w").close()
            _bind(libc, f"/etc/{name}", inside(f"/etc/{name}"))
    if os.path.islink("/etc/localtime"):
        os.symlink(os.readlink("/etc/localtime"), inside("/etc/localtime"))
    uid, gid = cfg["uid"], cfg["gid"]
    synthetic = {
        "passwd": f"root:x:0:0:root:/:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}:sandbox:/tmp:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nsandbox:x:{gid}:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    }
    for name, text in synthetic.items():
        with open(inside(f"/etc/{name}"), "w") as handle:
            handle.write(text)

    os.makedirs(inside("/dev"))
    for name in ("null", "zero", "full", "random", "urandom"):
        open(inside(f"/dev/{name}"), "w").close()
        _mount(libc, f"/dev/{name}", inside(f"/dev/{name}"), None, _MS_BIND)
        _mount(libc, None, inside(f"/dev/{name}"), None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NOEXEC)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, inside(f"/dev/{name}"))
    for path in ("/dev/shm", "/tmp"):
        os.makedirs(inside(path))
        os.chmod(inside(path), 0o1777)
    os.makedirs(inside("/proc"))
    os.makedirs(inside("/sandbox"))
    os.chmod(inside("/sandbox"), 0o700)
    if os.geteuid() == 0:
        os.chown(inside("/sandbox"), uid, gid)
    os.chroot(new_root)
    os.chdir("/sandbox")


def _set_limits(cfg: dict) -> None:
    import resource

    limits = {
        resource.RLIMIT_CPU: (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1),
        resource.RLIMIT_AS: (cfg["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (cfg["file_size_mb"] << 20,) * 2,
        resource.RLIMIT_NOFILE: (cfg["max_open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if os.geteuid() == 0:
        limits[resource.RLIMIT_NPROC] = (cfg["max_processes"],) * 2
    else:
        # Without root the program keeps our uid, and RLIMIT_NPROC counts all of that uid's processes.
        mine = sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == os.getuid())
        limits[resource.RLIMIT_NPROC] = (mine + cfg["max_processes"],) * 2
    for which, (soft, hard) in limits.items():
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


def _owner(pid: str) -> int:
    """The real uid of a live process, -1 for a zombie or a process that is gone.

    Read from status: /proc/PID itself belongs to root while a process is not dumpable.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                    return -1
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _drop_privileges(libc, cfg: dict, flags: int) -> bool:
    """Lose every privilege for good; returns whether there was one to lose and it is gone."""
    dropped = False
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears all capabilities (no KEEP_CAPS)
        dropped = True
    elif flags & _CLONE_NEWUSER:
        import ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            ]

        _checked(libc, libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")
        dropped = True
    _checked(libc, libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # Not dumpable: /proc/self/mem and ptrace are closed to the program, and so to its children.
    _checked(libc, libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    return dropped


def _write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, data)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _tripwire(
    fd: int,
    *,
    _write=os.write,
    _exit=os._exit,
    _type=type,
    _str=str,
    _bytes=bytes,
    _events=_TRIPWIRE_EVENTS,
    _code=_EXIT_TAMPER,
):
    """The audit hook that ends the program, as a failure, when it reaches into the harness.

    It runs on the program's thread, the main thread, so a signal handler of the program can run on top of
    it and read its locals: it holds nothing worth reading (the nonce is in the verdict thread, see
    :func:`_start_verdict_thread`). A handler that raises there makes the audited call fail, which is what
    the hook is for. Everything the hook uses is bound here, before the program runs: no global or builtin
    lookups, no calls into program code, no allocation of objects the garbage collector tracks, no audited
    operation, and it never raises: raising would hand the program a traceback into the hook's frame.
    """

    def hook(event, args):
        tripped = event in _events or event.startswith("ctypes.")
        if not tripped and event == "open" and args:
            path = args[0]
            # /proc/<pid>/mem by any spelling ("mem" relative to a /proc/self directory included)
            if _type(path) is _str:
                tripped = path == "mem" or path.endswith("/mem")
            elif _type(path) is _bytes:
                tripped = path == b"mem" or path.endswith(b"/mem")
            if tripped:
                event = "open(/proc/*/mem)"
        if tripped:
            try:
                _write(fd, b"TAMPER " + event.encode() + b"\n")
            finally:
                _exit(_code)

    return hook


def _verdict_site(nonce: bytes | None, fd: int, *, _getpid=os.getpid, _exit=os._exit):
    """Returns ``reach()``, which the harness calls twice from one call site: before and after the program.

    The first call notes where its caller (the harness frame) stands and starts the verdict thread with the
    nonce, the result fd and that position; then the nonce is gone from every Python object (this closure
    included). The second call wakes the verdict thread, which writes the nonce and ends the process with
    exit code 0 if, and only if, the harness frame stands at that same call site again, and waits for it.
    Anyone may call ``reach()`` or release the wake-up lock: the position of the harness frame is the proof.
    """
    import _thread
    import time

    wake = _thread.allocate_lock()  # a lock, not a pipe: no descriptor for the program to trip over
    wake.acquire()
    owner, release, sleep = _getpid(), wake.release, time.sleep

    def reach() -> None:
        nonlocal nonce
        if nonce is not None:
            harness = sys._getframe(1)
            _start_verdict_thread(nonce, fd, wake, harness, harness.f_lasti)
            nonce = None
            return
        if _getpid() != owner:  # a forked child of the program ran to the end: no verdict thread lives here
            _exit(0)
        with contextlib.suppress(RuntimeError):  # released already (by the program): a wake-up is pending
            release()
        sleep(_VERDICT_WAIT)  # the verdict thread ends the process long before

    return reach


def _start_verdict_thread(nonce: bytes, fd: int, wake, harness_frame, site: int) -> None:
    """Start the thread that alone holds the nonce, and runs no Python code at all.

    It is a pipeline of C iterators consumed by ``deque(..., 0)``: block on the wake-up lock; at each
    wake-up read ``harness_frame.f_lasti``; only when it equals ``site`` take the nonce, write it to the
    result fd and ``os._exit(0)``. No Python frame ever runs on this thread, so there is none for a signal
    handler (they run on the main thread only), a finalizer or a traceback to walk into, and the iterators
    that hold the nonce are referenced from this thread's C stack only (reaching them takes ``gc`` or
    ``ctypes``: tripwires). The thread starts with every signal blocked, so signals keep going to the
    program's threads as they would without it.
    """
    import _collections
    import _functools
    import _operator
    import _thread
    import itertools
    import signal

    compress, repeat, partial = itertools.compress, itertools.repeat, _functools.partial
    wake_ups = iter(wake.acquire, False)  # acquire() blocks until someone releases the lock, then is True
    there = map(site.__eq__, map(_operator.attrgetter("f_lasti"), compress(repeat(harness_frame), wake_ups)))
    written = map(partial(os.write, fd), compress(repeat(nonce), there))
    verdict = map(os._exit, compress(repeat(0), written))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        _thread.start_new_thread(_collections.deque, (verdict, 0))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _signal_quieter():
    """Returns ``quiet()``: after the program's last line, no signal or timer of the program runs its code.

    It blocks every signal on the main thread, cancels the interval timers (``alarm`` included), detaches a
    wake-up fd and puts back the dispositions the harness started with (SIG_DFL/SIG_IGN). A handler that
    was already pending runs once more, inside ``quiet()``; if it raises, the run fails. Bound now, before
    the program can replace attributes of the ``signal`` module.
    """
    import _signal

    block, setitimer, set_wakeup_fd = _signal.pthread_sigmask, _signal.setitimer, _signal.set_wakeup_fd
    getsignal, install, SIG_BLOCK = _signal.getsignal, _signal.signal, _signal.SIG_BLOCK
    everything = _signal.valid_signals()
    timers = (_signal.ITIMER_REAL, _signal.ITIMER_VIRTUAL, _signal.ITIMER_PROF)
    dispositions = [(sig, handler) for sig in everything if (handler := getsignal(sig)) is not None]

    def quiet() -> None:
        block(SIG_BLOCK, everything)
        for which in timers:
            setitimer(which, 0)
        set_wakeup_fd(-1)
        for sig, handler in dispositions:
            if getsignal(sig) is not handler:
                install(sig, handler)

    return quiet


def _failure_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, SystemExit):
        return f"exited before its last line (SystemExit({exc.code!r}))"
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    return f"{name}: {message}" if message else name


def _start_program(cfg: dict, fd: int, info: dict) -> None:
    """Run the program on the process's main thread, as plain ``python`` would. Never returns.

    Why the main thread: Python runs signal handlers only there, so a program that uses ``signal.alarm``,
    ``setitimer`` or its own handlers needs it. The cost: a handler runs on top of whatever frame is
    executing on the main thread, the audit hook's and the harness's own included, and can read their
    locals or raise there. So none of them holds the nonce: it lives in a verdict thread that runs only C
    code (:func:`_start_verdict_thread`), and the proof of completion is where the harness frame stands,
    which no handler can move. The harness's critical sections are safe to interrupt: the audit hook holds
    nothing (a handler raising there only makes the audited call fail); the harness frame reaches its
    verdict site a second time only when ``exec`` returned normally (the failure path re-raises rather than
    fall through); and before it asks for the verdict it quiets the program's signals (:func:`_signal_quieter`),
    so that a late alarm cannot kill or interrupt the verdict of a program that already finished.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        _run_program(cfg, fd, info)
    finally:
        _write(fd, b"FAIL the harness ended without a verdict\n")
        os._exit(_EXIT_FAILED)


def _run_program(cfg: dict, fd: int, info: dict) -> None:
    """Compile and run the program; the nonce is written only if it ran to its last line. Ends the process."""
    import builtins
    import json
    import traceback

    real_exit, stdio = os._exit, (sys.stdout, sys.stderr)
    header = b"INFO " + json.dumps(info).encode() + b"\n" + _READY
    source = cfg.pop("source")
    reach = _verdict_site(cfg.pop("nonce").encode(), fd)
    try:
        code = compile(source, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        _write(fd, header + b"FAIL " + _failure_reason(exc).encode(errors="replace")[:300] + b"\n")
        traceback.print_exception(exc, limit=0)
        real_exit(_EXIT_FAILED)
    del source
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    before, missing = dict(builtins.__dict__), object()
    quiet = _signal_quieter()
    for done in (False, True):
        if done:
            try:
                quiet()
            except BaseException as exc:
                reason = _failure_reason(exc).encode(errors="replace")[:200]
                _write(fd, b"FAIL a signal handler raised after the last line: " + reason + b"\n")
                _flush(stdio)
                real_exit(_EXIT_FAILED)
                raise
            now = builtins.__dict__
            changed = sorted(name for name, value in before.items() if now.get(name, missing) is not value)
            if changed:
                _write(fd, b"FAIL program rebound builtins: " + ", ".join(changed[:5]).encode() + b"\n")
                _flush(stdio)
                real_exit(_EXIT_FAILED)
            _flush(stdio)
        reach()  # one call site for both passes: the verdict thread answers only while this frame stands here
        if not done:
            sys.addaudithook(_tripwire(fd))
            _write(fd, header)
            try:
                exec(code, module.__dict__)
            except BaseException as exc:
                try:
                    _write(fd, b"FAIL " + _failure_reason(exc).encode(errors="replace")[:300] + b"\n")
                    program_frames = exc.__traceback__ and exc.__traceback__.tb_next  # from the program on
                    traceback.print_exception(type(exc), exc, program_frames)
                except BaseException:
                    _write(fd, b"FAIL unprintable exception\n")
                finally:
                    _flush(stdio)
                    real_exit(_EXIT_FAILED)
                raise  # never fall through to the verdict site, whatever happened to real_exit
    why = f"no verdict within {_VERDICT_WAIT:g}s of the last line (a program thread holding the GIL or the lock?)"
    _write(fd, b"FAIL " + why.encode() + b"\n")
    real_exit(_EXIT_FAILED)


def _flush(stdio) -> None:
    for stream in (*stdio, sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _program_main(libc, cfg: dict, fd: int, info: dict, flags: int) -> None:
    import builtins  # noqa: F401  (what _run_program needs, loaded while the files are still readable)
    import json  # noqa: F401
    import signal  # noqa: F401
    import time  # noqa: F401
    import traceback  # noqa: F401

    try:
        _set_limits(cfg)
        info["privileges_dropped"] = _drop_privileges(libc, cfg, flags)
        os.closerange(3, fd)
        os.closerange(fd + 1, 1 << 20)
        stdlib = os.path.dirname(os.__file__)
        if not os.access(stdlib, os.R_OK | os.X_OK):
            raise OSError(
                f"the standard library ({stdlib}) is not readable by the unprivileged sandbox user; "
                "use an interpreter installed in a world-readable place (python=...)"
            )
    except Exception as exc:
        _write(fd, f"ERROR sandbox setup failed: {exc}\n".encode())
        os._exit(_EXIT_SETUP)
    _start_program(cfg, fd, info)


def _init_main(libc, cfg: dict, fd: int, info: dict, flags: int) -> None:
    """pid 1 of the new pid namespace: start the program, reap orphans, and exit with its status."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if info["filesystem_isolated"]:
        try:
            _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        except OSError as exc:
            info["notes"].append(str(exc))
    child = os.fork()
    if child == 0:
        _program_main(libc, cfg, fd, info, flags)
    os.close(fd)
    cfg.clear()
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os._exit(_exit_code(status))


def _harness_main(argv: list[str]) -> None:
    import json
    import signal

    cfg_fd, fd = int(argv[1]), int(argv[2])
    chunks = []
    while chunk := os.read(cfg_fd, 1 << 16):
        chunks.append(chunk)
    os.close(cfg_fd)
    cfg = json.loads(b"".join(chunks))
    del chunks
    info: dict = {
        "network_isolated": False,
        "pid_namespace": False,
        "filesystem_isolated": False,
        "privileges_dropped": False,
        "notes": [],
    }
    try:
        libc = _libc()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        flags = _unshare(libc, info["notes"]) if cfg["namespaces"] else 0
        info["network_isolated"] = bool(flags & _CLONE_NEWNET)
        info["pid_namespace"] = bool(flags & _CLONE_NEWPID)
        if flags & _CLONE_NEWUTS:
            libc.sethostname(b"sandbox", 7)
        if flags & _CLONE_NEWNS:
            _build_root(libc, cfg)
            info["filesystem_isolated"] = True
        # The harness processes hold the nonce: keep their memory closed to the program (forks inherit
        # this). Only now: a process that is not dumpable can no longer write its own uid_map.
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception as exc:
        _write(fd, f"ERROR sandbox setup failed: {exc}\n".encode())
        os._exit(_EXIT_SETUP)
    if not info["pid_namespace"]:
        _program_main(libc, cfg, fd, info, flags)
    child = os.fork()
    if child == 0:
        _init_main(libc, cfg, fd, info, flags)
    os.close(fd)
    cfg.clear()
    _, status = os.waitpid(child, 0)
    os._exit(_exit_code(status))


if __name__ == "__main__":
    _harness_main(sys.argv)


# ----------------------------------------------------------------------------------------------------
# Parent half: runs in the pytest process and never executes the program itself.
# ----------------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402  (kept below the harness entry so the child does not pay for them)
import json  # noqa: E402
import secrets  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

STATUSES = ("passed", "failed", "timeout", "error")
# Inherited from the parent when set; everything else is dropped. PATH, HOME and TMPDIR are set, not inherited.
ENV_ALLOW_LIST = ("LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one program. ``cpu_seconds=None`` means the wall-time limit, rounded up, plus one."""

    cpu_seconds: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    disk_mb: int = 64
    max_processes: int = 32
    max_open_files: int = 64
    output_bytes: int = 64 * 1024


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What happened to one program. ``status`` is one of :data:`STATUSES`; values are builtin types."""

    status: str
    reason: str = ""
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    exit_code: int | None = None
    output_truncated: bool = False
    network_isolated: bool = False
    filesystem_isolated: bool = False
    pid_namespace: bool = False
    privileges_dropped: bool = False
    sandbox_uid: int | None = None

    @property
    def passed(self) -> bool:
        """True only when the program ran to its last line."""
        return self.status == "passed"

    def as_dict(self) -> dict[str, object]:
        """Builtin types only, for TestReports and the JSON report."""
        return dataclasses.asdict(self)


def run_check(
    program: str,
    timeout: float = 10.0,
    *,
    limits: SandboxLimits | None = None,
    python: str | None = None,
    namespaces: bool = True,
) -> CheckResult:
    """Run ``program`` (solution followed by its tests) in a fresh sandboxed child process.

    "passed" means it ran to its last line: an early exit of any kind, an exception, a tripped tamper
    check or a limit is not a pass. ``python`` picks the interpreter (default: this one, without site
    packages); ``namespaces=False`` skips the Linux namespaces (for tests of the fallback only).
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    limits = limits or SandboxLimits()
    started = time.monotonic()
    root = os.geteuid() == 0
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if root else os.getuid()
    gid = uid if root else os.getgid()
    workdir = tempfile.mkdtemp(prefix="llmgate-sandbox-")
    try:
        if root:
            os.chown(workdir, uid, gid)
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else int(timeout) + 2
        cfg = {
            "source": program,
            "nonce": secrets.token_hex(16),
            "uid": uid,
            "gid": gid,
            "cpu_seconds": cpu,
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "disk_mb": limits.disk_mb,
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
            "namespaces": namespaces,
        }
        return _Run(cfg, timeout, limits, python or os.path.realpath(sys.executable), workdir, started).execute()
    finally:
        _remove_tree(workdir)


def run_checks(
    programs: Sequence[str],
    timeout: float = 10.0,
    *,
    max_workers: int | None = None,
    limits: SandboxLimits | None = None,
    python: str | None = None,
) -> list[CheckResult]:
    """Run many programs, at most ``max_workers`` at once (default: the CPU count); results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(max_workers or os.cpu_count() or 1, len(programs) or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmgate-sandbox") as pool:
        return list(pool.map(lambda program: run_check(program, timeout, limits=limits, python=python), programs))


class _Run:
    """One child process: start it, feed it, read its three pipes with bounds, kill it, judge it."""

    def __init__(
        self, cfg: dict, timeout: float, limits: SandboxLimits, python: str, workdir: str, started: float
    ) -> None:
        self.cfg, self.timeout, self.limits, self.python = cfg, timeout, limits, python
        self.workdir, self.started = workdir, started
        self.nonce = cfg["nonce"].encode()

    def execute(self) -> CheckResult:
        cfg_r, cfg_w = os.pipe()
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        argv = [self.python, "-I", "-S", os.path.abspath(__file__), str(cfg_r), str(res_w)]
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(cfg_r, res_w),
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (cfg_r, cfg_w, res_r, res_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            return self._result("error", f"could not start the sandbox: {exc}")
        for fd in (cfg_r, res_w, out_w, err_w):
            os.close(fd)
        try:
            try:
                _write_all(cfg_w, json.dumps(self.cfg).encode())
            except BrokenPipeError:
                pass  # the harness died first; its exit status says why
            finally:
                os.close(cfg_w)
            streams, timed_out = self._collect(
                proc, {out_r: self.limits.output_bytes, err_r: self.limits.output_bytes, res_r: 4096}
            )
        finally:
            _kill_group(proc)
            proc.wait()
            for fd in (out_r, err_r, res_r):
                os.close(fd)
        self._kill_uid()
        return self._judge(proc.returncode, streams, timed_out, out_r, err_r, res_r)

    def _collect(self, proc: subprocess.Popen, caps: dict[int, int]) -> tuple[dict[int, tuple[bytes, bool]], bool]:
        """Read the pipes until they close, keeping at most ``caps[fd]`` bytes each; kill at the deadline."""
        buffers = {fd: bytearray() for fd in caps}
        truncated = dict.fromkeys(caps, False)
        deadline = self.started + self.timeout
        timed_out = exited = False
        pipes = set(caps)
        with selectors.DefaultSelector() as selector:
            for fd in caps:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            pidfd = _pidfd(proc.pid)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ)
            try:
                while pipes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if exited:
                            break  # a process we could not reach still holds a pipe: stop listening
                        timed_out = exited = True
                        _kill_group(proc)
                        deadline = time.monotonic() + 2.0
                        continue
                    for key, _ in selector.select(remaining if pidfd is not None else min(remaining, 0.05)):
                        if key.fd == pidfd:
                            selector.unregister(pidfd)
                        elif self._read(key.fd, buffers[key.fd], caps[key.fd], truncated):
                            selector.unregister(key.fd)
                            pipes.discard(key.fd)
                    if not exited and _has_exited(proc, pidfd, selector):
                        # The leader is a zombie until we wait for it, so its pgid cannot have been reused:
                        # kill what is left of the group and of the run's uid (daemons), then give the pipes
                        # a moment to close.
                        exited = True
                        _kill_group(proc)
                        self._kill_uid()
                        deadline = min(deadline, time.monotonic() + 1.0)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        return {fd: (bytes(buffers[fd]), truncated[fd]) for fd in caps}, timed_out

    @staticmethod
    def _read(fd: int, buffer: bytearray, cap: int, truncated: dict[int, bool]) -> bool:
        """Read one chunk, keep what fits under ``cap``; returns True at end of file."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        room = cap - len(buffer)
        buffer += chunk[: max(room, 0)]
        truncated[fd] |= len(chunk) > room
        return False

    def _kill_uid(self) -> None:
        if self.cfg["uid"] >= _UID_BASE:
            _kill_uid(self.cfg["uid"])

    def _judge(
        self,
        returncode: int,
        streams: dict[int, tuple[bytes, bool]],
        timed_out: bool,
        out_r: int,
        err_r: int,
        res_r: int,
    ) -> CheckResult:
        code = 128 - returncode if returncode < 0 else returncode
        channel = streams[res_r][0]
        info: dict = {}
        if channel.startswith(b"INFO "):
            line, _, channel = channel.partition(b"\n")
            try:
                info = json.loads(line[5:])
            except ValueError:
                info = {}
        ready = channel.startswith(_READY)
        tail = channel[len(_READY) :] if ready else channel
        text = tail.decode(errors="replace").strip()
        extra = {
            "stdout": streams[out_r][0].decode(errors="replace"),
            "stderr": streams[err_r][0].decode(errors="replace"),
            "exit_code": code,
            "output_truncated": streams[out_r][1] or streams[err_r][1],
            "network_isolated": bool(info.get("network_isolated")),
            "filesystem_isolated": bool(info.get("filesystem_isolated")),
            "pid_namespace": bool(info.get("pid_namespace")),
            "privileges_dropped": bool(info.get("privileges_dropped")),
        }
        if timed_out:
            return self._result("timeout", f"wall-time limit of {self.timeout:g}s exceeded", **extra)
        if not ready:
            if text.startswith("ERROR "):
                return self._result("error", text[6:][:300], **extra)
            detail = str(extra["stderr"]).strip().splitlines()[-1:] or [f"exit code {code}"]
            return self._result(
                "error", f"the sandbox harness failed before the program started: {detail[0]}"[:300], **extra
            )
        if tail == self.nonce and code == 0:
            return self._result("passed", "", **extra)
        if code == 128 + signal.SIGXCPU:
            return self._result("timeout", "CPU-time limit exceeded", **extra)
        if text.startswith("FAIL "):
            return self._result("failed", text[5:].splitlines()[0][:300], **extra)
        if text.startswith("TAMPER "):
            event = text[7:].splitlines()[0][:100]
            return self._result("failed", f"tampering detected ({event}): the program reached for the harness", **extra)
        if code > 128 and code - 128 in signal.valid_signals():
            return self._result("failed", f"killed by {signal.Signals(code - 128).name}", **extra)
        why = f"exited with code {code} before its last line"
        if tail:
            why += " (unexpected data on the result channel)"
        return self._result("failed", why, **extra)

    def _result(self, status: str, reason: str, **fields: Any) -> CheckResult:
        uid = self.cfg["uid"] if self.cfg["uid"] >= _UID_BASE else None
        return CheckResult(
            status=status, reason=reason, duration=round(time.monotonic() - self.started, 4), sandbox_uid=uid, **fields
        )


def _child_env() -> dict[str, str]:
    env = {"PATH": SAFE_PATH, "HOME": "/tmp", "TMPDIR": "/tmp"}
    env.update({name: os.environ[name] for name in ENV_ALLOW_LIST if name in os.environ})
    return env


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _has_exited(proc: subprocess.Popen, pidfd: int | None, selector: selectors.BaseSelector) -> bool:
    """Whether the child has exited, without reaping it."""
    if pidfd is not None:
        return pidfd not in selector.get_map()
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (call before reaping the leader, so the pgid is still ours)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill every process of a per-run uid, including ones that left the process group with setsid()."""
    for _ in range(20):
        pids = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == uid]
        if not pids:
            return
        # kill(-1) from a process of that uid reaches exactly that uid's processes, atomically (a fork bomb
        # cannot outrun it); /bin/kill is used because the interpreter may not be readable by that uid.
        kill = next((path for path in ("/bin/kill", "/usr/bin/kill") if os.access(path, os.X_OK)), None)
        if kill is not None:
            subprocess.run(
                [kill, "-9", "--", "-1"],
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": SAFE_PATH},
                check=False,
                timeout=30,
            )
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _remove_tree(path: str) -> None:
    import shutil

    # A program can leave directories without permissions; restore them (never through a symlink) first.
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)
