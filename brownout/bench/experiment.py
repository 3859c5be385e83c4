"""Run one workload against several server configurations and compare them.

Each configuration is a list of `brownout serve` flags. The server is started as its own
process (exactly as a user starts it), the load client talks to it over HTTP only, and the
server is stopped before the next configuration starts, so runs do not share a machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import httpx

from brownout.bench.cli import run_bench
from brownout.bench.report import compare_runs

log = logging.getLogger(__name__)

# every process this project starts on a GPU machine keeps NVLink multicast off
_GPU_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class ServerConfig:
    label: str  # e.g. "off", "aimd", "predictive"
    flags: list[str] = field(default_factory=list)  # `brownout serve` flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(flags: Sequence[str], log_path: Path, startup_timeout_s: float = 600.0,
                   port: Optional[int] = None) -> Iterator[str]:
    """Start `brownout serve` with `flags`; yield its base URL once /health answers."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "brownout.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), *flags]
    env = {**os.environ, **_GPU_SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, url, startup_timeout_s, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not healthy after {timeout_s:.0f} s (log: {log_path})")


def run_configs(configs: Sequence[ServerConfig], workload: str, out_dir: Path, *,
                prompts: str = "synthetic", slo_ttft: float, slo_tpot: float,
                eval_table: Optional[Path] = None, progress: bool = True,
                bench_kw: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One bench run per configuration on the same workload, then a side-by-side comparison."""
    run_dirs = []
    for cfg in configs:
        run_dir = out_dir / cfg.label
        log.info("configuration %s: brownout serve %s", cfg.label, " ".join(cfg.flags))
        with server_process(cfg.flags, out_dir / f"server-{cfg.label}.log") as url:
            run_bench(url, workload, prompts, run_dir, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                      label=cfg.label, policy=cfg.label, progress=progress, **(bench_kw or {}))
        run_dirs.append(run_dir)
    return compare_runs(run_dirs, out_dir, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                        baseline_label=configs[0].label, eval_table=eval_table)
