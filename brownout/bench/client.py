"""Async load client: replays a request schedule against an OpenAI-compatible server.

Each request is sent at its scheduled time to /v1/completions (or /v1/chat/completions)
with `stream=true` and `stream_options.include_usage`, exactly as a user's client would.
Per request it records (seconds from the start of the run): scheduled and actual send
time (`first_sent`, and `sent` of the last attempt), the time of every chunk that carried
a token (see `_is_token`), completion, HTTP status, error text, output tokens (the final
usage chunk if the server sends one, else the count of token chunks) and prompt tokens. 429 and 503 are recorded as rejected with their Retry-After
and are not retried unless `max_retries` says so. Records go to requests.jsonl as they
finish. Meanwhile /metrics is scraped every `scrape_interval_s` (Prometheus text:
brownout_tau{phase=...}, vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc)
into metrics.jsonl.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import aiohttp
from tqdm import tqdm

from brownout.bench.datasets import BenchRequest

logger = logging.getLogger(__name__)

REJECT_STATUSES = (429, 503)
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, value))
    return out


def summarize_metrics(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """The gauges the report uses; sums over other labels (e.g. model_name)."""
    out: dict[str, Any] = {}
    wanted = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
              "vllm:kv_cache_usage_perc": "kv_cache_usage"}
    for name, labels, value in samples:
        if name == "brownout_tau" and "phase" in labels:
            out[f"tau_{labels['phase']}"] = value
        elif name in wanted:
            out[wanted[name]] = out.get(wanted[name], 0.0) + value
        elif name.startswith("brownout_") and not name.endswith(("_bucket", "_created")):
            key = name + "".join(f",{k}={v}" for k, v in sorted(labels.items()))
            out.setdefault("brownout", {})[key] = value
    return out


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class LoadClient:
    def __init__(self, url: str, *, model: Optional[str] = None, chat: bool = False,
                 api_key: Optional[str] = None, ignore_eos: bool = True,
                 temperature: float = 0.0, timeout_s: float = 600.0, max_retries: int = 0,
                 scrape_interval_s: float = 1.0, max_connections: int = 4096):
        self.url = base_url(url)
        self.model, self.chat, self.api_key = model, chat, api_key
        self.ignore_eos, self.temperature = ignore_eos, temperature
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.scrape_interval_s, self.max_connections = scrape_interval_s, max_connections
        self._t0 = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _body(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model or "default", "max_tokens": req.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    async def resolve_model(self, session: aiohttp.ClientSession) -> None:
        if self.model:
            return
        try:
            async with session.get(f"{self.url}/v1/models", headers=self._headers()) as r:
                data = await r.json()
                self.model = data["data"][0]["id"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, ValueError):
            logger.warning("could not read the model name from /v1/models; sending 'default'")

    # -- one request --------------------------------------------------------------------
    async def send(self, session: aiohttp.ClientSession, req: BenchRequest) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "index": req.index, "scheduled": req.send_time_s, "first_sent": None, "sent": None,
            "first_token": None,
            "token_times": [], "done": None, "status": None, "error": None, "rejected": False,
            "retry_after": None, "output_tokens": 0, "prompt_tokens": None,
            "max_tokens": req.max_tokens, "prompt_len_hint": req.prompt_len_hint,
            "finish_reason": None, "attempts": 0}
        for attempt in range(self.max_retries + 1):
            rec.update(token_times=[], first_token=None, error=None, rejected=False,
                       retry_after=None, output_tokens=0, attempts=attempt + 1)
            await self._attempt(session, req, rec)
            if not rec["rejected"] or attempt == self.max_retries:
                break
            await asyncio.sleep(rec["retry_after"] if rec["retry_after"] is not None else 1.0)
        rec["done"] = self._now()
        return rec

    async def _attempt(self, session, req, rec) -> None:
        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        rec["sent"] = self._now()
        if rec["first_sent"] is None:
            rec["first_sent"] = rec["sent"]
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with session.post(self.url + path, json=self._body(req), headers=self._headers(),
                                    timeout=timeout) as resp:
                rec["status"] = resp.status
                if resp.status != 200:
                    rec["error"] = (await resp.text())[:500]
                    if resp.status in REJECT_STATUSES:
                        rec["rejected"] = True
                        rec["retry_after"] = _retry_after(resp.headers.get("Retry-After"))
                    return
                await self._read_stream(resp, rec)
        except Exception as e:  # one bad response must not end the whole run
            rec["error"] = f"{type(e).__name__}: {e}"[:500]

    def _is_token(self, choice: dict[str, Any]) -> bool:
        """Whether a streamed choice carries a generated token. Text counts; so does an
        empty non-final chunk (a token whose text the server holds back, e.g. half a
        UTF-8 character); a role-only chat chunk or a bare finish chunk does not."""
        final = choice.get("finish_reason") is not None
        if self.chat:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                return True
            return "role" not in delta and not final and "delta" in choice
        text = choice.get("text")
        return bool(text) or (text is not None and not final)

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: dict[str, Any]) -> None:
        usage = None
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            now = self._now()
            chunk = json.loads(payload)
            if "error" in chunk:
                rec["error"] = json.dumps(chunk["error"])[:500]
                break
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if self._is_token(choice):
                    rec["token_times"].append(now)
                    if rec["first_token"] is None:
                        rec["first_token"] = now
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
        rec["output_tokens"] = len(rec["token_times"])
        if usage:
            rec["output_tokens"] = int(usage.get("completion_tokens") or rec["output_tokens"])
            rec["prompt_tokens"] = usage.get("prompt_tokens")

    # -- the run ------------------------------------------------------------------------
    async def _scrape(self, session, out_file, stop: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                async with session.get(f"{self.url}/metrics", headers=self._headers(),
                                       timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        row = {"t": self._now(), **summarize_metrics(parse_prometheus(await r.text()))}
                        out_file.write(json.dumps(row) + "\n")
                        out_file.flush()
                        failures = 0
                    else:
                        failures += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failures += 1
            if failures == 5:
                logger.warning("/metrics unreachable 5 times in a row; still trying")
            try:
                await asyncio.wait_for(stop.wait(), self.scrape_interval_s)
                return
            except asyncio.TimeoutError:
                pass

    async def run(self, requests: Sequence[BenchRequest], out_dir: str | Path,
                  progress: bool = True) -> list[dict[str, Any]]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        connector = aiohttp.TCPConnector(limit=self.max_connections)
        records: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as session:
            await self.resolve_model(session)
            with open(out_dir / "requests.jsonl", "w") as req_file, \
                    open(out_dir / "metrics.jsonl", "w") as met_file, \
                    tqdm(total=len(requests), desc="requests", unit="req",
                         disable=not progress) as bar:
                self._t0 = time.perf_counter()
                stop = asyncio.Event()
                scraper = asyncio.create_task(self._scrape(session, met_file, stop))

                async def one(req: BenchRequest) -> None:
                    rec = await self.send(session, req)
                    records.append(rec)
                    req_file.write(json.dumps(rec) + "\n")
                    bar.update(1)

                tasks = []
                for req in sorted(requests, key=lambda r: r.send_time_s):
                    delay = req.send_time_s - self._now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(req)))
                await asyncio.gather(*tasks)
                stop.set()
                await scraper
        return sorted(records, key=lambda r: r["index"])
