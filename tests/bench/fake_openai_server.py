"""A tiny OpenAI-style streaming server for client tests, run in a background thread.

Streams `max_tokens` text chunks: the first after `first_delay` s, then one every `itl` s,
a finish chunk, a usage chunk when asked (`stream_options.include_usage`), then [DONE].
A prompt containing REJECT gets 429 with Retry-After: 2; FAIL gets 500; ERRORMID gets an
error event mid-stream; HOLD makes the second token's text empty (held back). GET /metrics serves fixed Prometheus gauges (`tau` settable).
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager

from aiohttp import web


class FakeServer:
    def __init__(self, first_delay: float = 0.05, itl: float = 0.01, usage: bool = True,
                 tau: float = 0.75):
        self.first_delay, self.itl, self.usage, self.tau = first_delay, itl, usage, tau
        self.bodies: list[dict] = []
        self.metrics_hits = 0
        self.in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-moe", "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_hits += 1
        text = (
            "# HELP brownout_tau current threshold\n# TYPE brownout_tau gauge\n"
            f'brownout_tau{{phase="prefill"}} {self.tau}\n'
            f'brownout_tau{{phase="decode"}} {self.tau / 2}\n'
            f'vllm:num_requests_running{{model_name="fake-moe"}} {self.in_flight}\n'
            'vllm:num_requests_waiting{model_name="fake-moe"} 3.0\n'
            'vllm:kv_cache_usage_perc{model_name="fake-moe"} 0.25\n'
            'brownout_step_latency_seconds_bucket{phase="decode",le="0.1"} 4.0\n'
            'brownout_violations_total{phase="decode"} 7.0\n')
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if "REJECT" in prompt:
            return web.json_response({"error": {"message": "queue full"}}, status=429,
                                     headers={"Retry-After": "2"})
        if "FAIL" in prompt:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.in_flight += 1
        try:
            await self._stream(resp, body, chat, prompt)
        finally:
            self.in_flight -= 1
        return resp

    async def _stream(self, resp, body, chat, prompt) -> None:
        async def send(obj) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if chat:  # a role-only first chunk, as OpenAI sends it: not a token
            await send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        await asyncio.sleep(self.first_delay)
        n = body["max_tokens"]
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl)
            if "ERRORMID" in prompt and i == 2:
                await send({"error": {"message": "engine died"}})
                return
            text = "" if "HOLD" in prompt and i == 1 else f" w{i}"  # a held-back token
            piece = {"delta": {"content": text} if text else {}} if chat else {"text": text}
            await send({"choices": [{"index": 0, **piece, "finish_reason": None}]})
        await send({"choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                 "finish_reason": "length"}]})
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            await send({"choices": [], "usage": {"prompt_tokens": len(prompt.split()),
                                                 "completion_tokens": n,
                                                 "total_tokens": n + len(prompt.split())}})
        await resp.write(b"data: [DONE]\n\n")


@contextmanager
def serve_fake(**kw):
    """Start a FakeServer on a free port in a thread; yields (base_url, server)."""
    server = FakeServer(**kw)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    started = threading.Event()
    port: list[int] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.append(runner.addresses[0][1])
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(10), "fake server did not start"
    try:
        yield f"http://127.0.0.1:{port[0]}", server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
