"""The engine in its own process: the API side stays torch-free, errors cross the process
boundary with their field / retry hint, a queue timeout is a 429, a dead engine is a 503,
and bad flags are clean CLI errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, start_server

CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from brownout.api.server import create_app
    from brownout.config import EngineConfig, ModelLoadConfig, SchedulerConfig, ServerConfig
    from brownout.api.engine_client import EngineClient
    from brownout.types import AdmissionError, SamplingParams, ValidationError

    async def main():
        config = EngineConfig(load=ModelLoadConfig(model=sys.argv[1], device="cpu"),
                              scheduler=SchedulerConfig(max_num_seqs=1, max_waiting_requests=1))
        client = EngineClient(config)
        create_app(client, ServerConfig())  # the app module imports torch-free too
        info = await client.start()
        report = {"max_model_len": info.max_model_len}
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        outs = [o async for o in client.generate("a", "Hello there", params)]
        report["tokens"] = len(outs[-1].output_token_ids)
        report["finished"] = outs[-1].finished
        chat = [o async for o in client.generate("b", [{"role": "user", "content": "hi"}], params)]
        report["chat_prompt_len"] = len(chat[-1].prompt_token_ids)
        try:
            await client.add_request("c", [10**9], params)
        except ValidationError as exc:
            report["bad_field"] = exc.field
        long = SamplingParams(max_tokens=50, ignore_eos=True)
        results = await asyncio.gather(*(client.add_request(f"d{i}", "Burst", long) for i in range(4)),
                                       return_exceptions=True)
        retry = [r.retry_after_s for r in results if isinstance(r, AdmissionError)]
        report["admission_refusals"], report["retry_after_s"] = len(retry), min(retry or [0])
        for r in results:
            if not isinstance(r, BaseException):
                client.abort(r.request_id)
        await client.shutdown()
        report["heavy_modules"] = sorted(m for m in sys.modules
                                         if m.split(".")[0] in ("torch", "transformers", "triton"))
        print("REPORT " + json.dumps(report))

    asyncio.run(main())
""")


def test_api_process_stays_torch_free(model_dir):
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, str(model_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT "):])
    assert report["heavy_modules"] == []
    assert report["tokens"] == 3 and report["finished"]
    assert report["chat_prompt_len"] > 0
    assert report["bad_field"] == "prompt"
    assert report["admission_refusals"] >= 1 and report["retry_after_s"] >= 1.0


@pytest.mark.parametrize("flags,named", [
    (["--slo-shrink-factor", "1.5"], "--slo-shrink-factor"),
    (["--slo-policy", "fixed"], "--fixed-tau"),
    (["--fixed-tau", "2"], "--fixed-tau"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--queue-timeout", "-1"], "--queue-timeout"),
])
def test_bad_flags_are_cli_errors(flags, named):
    proc = subprocess.run([sys.executable, "-m", "brownout.cli", "serve", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert named in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_fails_fast(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "brownout.cli", "serve", "--model",
                           str(tmp_path / "nothing"), "--device", "cpu", "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "brownout serve: error: --model: expected a checkpoint directory" in proc.stderr


def test_unloadable_model_fails_fast(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a checkpoint directory the engine cannot load
    proc = subprocess.run([sys.executable, "-m", "brownout.cli", "serve", "--model", str(broken),
                           "--device", "cpu", "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "engine failed to start" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, ["--max-num-seqs", "1", "--queue-timeout", "0.2"], tmp_path_factory)
    yield srv
    srv.stop()


def test_queue_timeout_is_429(server):
    body = {"prompt": "Long", "max_tokens": 400, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body))
            await asyncio.sleep(0.1)
            second = await http.post("/v1/completions", json={**body, "max_tokens": 2})
            return await first, second

    first, second = asyncio.run(go())
    assert first.status_code == 200
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "queue_timeout" and "retry-after" in second.headers


def test_stream_refused_before_its_first_token_is_429(server):
    """The queue timeout refuses a stream before its first token: the status says so (not a
    200 with an error event), with the time it waited as Retry-After."""
    body = {"prompt": "Long", "max_tokens": 400, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body))
            await asyncio.sleep(0.1)
            async with http.stream("POST", "/v1/completions",
                                   json={**body, "max_tokens": 2, "stream": True}) as second:
                second_body = json.loads(await second.aread())
            return await first, second, second_body

    first, second, second_body = asyncio.run(go())
    assert first.status_code == 200
    assert second.status_code == 429, second_body
    assert second_body["error"]["code"] == "queue_timeout"
    assert int(second.headers["retry-after"]) >= 1


def _engine_pid(server_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise LookupError("engine process not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine through /proc")
def test_dead_engine_gives_503(server):
    body = {"prompt": "Go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: {"))
            os.kill(_engine_pid(server.proc.pid), signal.SIGKILL)
            rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "engine_dead"
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
