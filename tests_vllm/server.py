"""A real vLLM OpenAI-compatible server process for the HTTP backend tests and benchmark.

``VLLMServer(folder).start()`` runs ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm serve`` console script looks up the distribution "vllm", which the CPU wheel
does not provide) in its own process group on a free port of 127.0.0.1, with the engine in
the server process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: it starts 3-4x faster on CPU),
and waits (bounded) for ``GET /health``; :meth:`kill` ends the whole group at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["CPU_ARGS", "VLLMServer", "free_port"]

#: the server flags of the CPU engine (the defaults of ``VLLMServer(args=...)``)
CPU_ARGS = ("--enforce-eager", "--block-size", "32", "--no-enable-chunked-prefill")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One ``api_server`` process serving ``folder`` as model ``name``."""

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str = "tiny",
        max_model_len: int = 128,
        log: Path | None = None,
        dtype: str = "float32",
        args: tuple[str, ...] = CPU_ARGS,
    ) -> None:
        """``args``: further server flags (the default: the CPU engine's settings)."""
        self.folder, self.name, self.max_model_len = Path(folder), name, max_model_len
        self.log, self.dtype, self.args = log, dtype, tuple(args)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.start_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, port: int | None = None, timeout_s: float = 240.0) -> VLLMServer:
        """Start the server (on ``port``, default a free one) and wait until it answers."""
        self.port = port or free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.folder), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.dtype, *self.args, "--max-model-len", str(self.max_model_len),
            "--served-model-name", self.name,
        ]  # fmt: skip
        # the engine in the server's own process: ready in ~27 s instead of 80-140 s here
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self.proc.returncode}: {cmd}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    self.start_s = time.monotonic() - t0
                    return self
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"the vLLM server did not answer /health within {timeout_s} s")

    def kill(self) -> None:
        """Kill the server's process group (SIGKILL) and reap it (bounded)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
