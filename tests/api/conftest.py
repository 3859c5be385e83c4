"""A real `brownout serve` process per test module, on the CPU, on a free local port.

The model is the embedded demo model when it is complete; otherwise a tiny random
checkpoint built with transformers (the server code path is the same).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from brownout.defaults import default_model_dir

    default = Path(default_model_dir())
    if (default / "config.json").is_file() and any(default.glob("*.safetensors")):
        return default
    from tiny import make_tiny_checkpoint

    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("api") / "tiny-moe")


class Server:
    """One server process; `url` is its base URL. Always `stop()` it."""

    def __init__(self, model: Optional[Path], args: list[str], log_path: Path,
                 env: Optional[dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "brownout.cli", "serve", "--port", str(self.port),
               "--device", "cpu", *(["--model", str(model)] if model else []), *args]
        self.log_path = log_path
        self._log = open(log_path, "w")
        inherited = {k: v for k, v in os.environ.items() if k != "BROWNOUT_API_KEY"}  # no auth unless asked
        env = {**inherited, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]), **(env or {})}
        # Own process group, so teardown reaches the engine process too.
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (the engine process) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()


def start_server(model: Optional[Path], args: list[str], tmp_path_factory,
                 env: Optional[dict[str, str]] = None) -> Server:
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = Server(model, args, log, env)
    try:
        return server.wait_ready()
    except Exception:
        server.stop()
        raise


def metric_value(text: str, name: str, labels: Optional[dict] = None) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
                found = True
    if not found:
        raise KeyError(name)
    return total
