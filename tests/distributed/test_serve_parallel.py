"""The server's engine process (a daemonic multiprocessing child) runs a tensor-parallel
engine: its worker processes start with it, serve, and stop with it, both on a clean
shutdown and when it is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from brownout.config import EngineConfig, ModelLoadConfig
from brownout.api.engine_client import EngineClient
from brownout.engine.llm import LLM
from brownout.types import SamplingParams

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields after the command name


def _workers_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes()
            if entry.name.isdigit() and b"brownout.engine.parallel_worker" in cmd \
                    and int(_stat(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)[0] in ("Z", "X")  # a zombie has exited
    except OSError:
        return True


def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def _config(path) -> EngineConfig:
    return EngineConfig(load=ModelLoadConfig(model=str(path), device="cpu", tensor_parallel_size=2,
                                             enable_expert_parallel=True))


def test_engine_process_serves_and_stops_its_workers(tiny_models):
    path = tiny_models["mixtral"]

    async def main():
        client = EngineClient(_config(path))
        await client.start()
        workers = _workers_of(client.worker_pid)
        outs = [o async for o in client.generate("a", PROMPT, GREEDY)]
        await client.shutdown()
        return workers, outs[-1].output_token_ids

    workers, tokens = asyncio.run(main())
    assert len(workers) == 1
    assert tokens == LLM(str(path), device="cpu").generate([PROMPT], GREEDY)[0].token_ids
    assert _wait_gone(workers)


def test_workers_exit_when_the_engine_process_is_killed(tiny_models):
    async def main():
        client = EngineClient(_config(tiny_models["mixtral"]))
        await client.start()
        workers = _workers_of(client.worker_pid)
        os.kill(client.worker_pid, signal.SIGKILL)
        await client.shutdown()
        return workers

    workers = asyncio.run(main())
    assert len(workers) == 1
    assert _wait_gone(workers)
