"""Prometheus metrics, named as vLLM names them, plus the brownout-specific ones.

Fed by the engine client's step feed (`EngineListener`), so every request is counted
whether or not its HTTP client is still connected. A request the engine finishes is counted
in `vllm:request_success_total` with its finish reason; one aborted before it finished (its
client went away, or the server ended it) is counted there as "abort" when the engine
client reports its end (`on_request_end`). Token times are the engine process's step-end
timestamps (monotonic clock, shared by both processes on one host). vLLM's request-level
histograms (prompt and generation tokens; queue, prefill, decode and inference time) are
observed once per request the engine finishes, from its `RequestMetrics`;
`vllm:iteration_tokens_total` once per engine step, from its `StepStats`.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from brownout.types import RequestOutput, StepStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
                0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
EXPERT_BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Tokens per engine step: vLLM's buckets for vllm:iteration_tokens_total.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Token-count histograms go up to the context length when the server does not give it.
DEFAULT_MAX_MODEL_LEN = 32768


def token_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's buckets for per-request token counts)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(buckets)
            buckets.append(m * scale)
        scale *= 10


class ServerMetrics:
    """All metrics of one server, in a private registry."""

    def __init__(self, model_name: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN):
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self._model = model_name
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Time per output token (per token, same as inter-token latency)",
                              m, buckets=ITL_BUCKETS, registry=r)
        self.request_tpot = Histogram("vllm:request_time_per_output_token_seconds",
                                      "Per request: (e2e - TTFT) / (output tokens - 1)",
                                      m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency",
                             m, buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent waiting",
                                    m, buckets=REQUEST_BUCKETS, registry=r)
        self._add_request_families(max_model_len)
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", m, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", m, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", m, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions", m, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Tokens of admitted requests looked up in the prefix cache", m,
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits",
                                   "Tokens found in the prefix cache (not computed)", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests",
                                       m + ["finished_reason"], registry=r)
        self.tau = Gauge("brownout_tau", "Brownout threshold (1 = exact model)", ["phase"], registry=r)
        self.top_k = Gauge("brownout_top_k", "Routed experts kept per token (expert shedding)",
                           ["phase"], registry=r)
        self.accuracy_spent = Gauge("brownout_accuracy_spent",
                                    "Mean perplexity increase of the rungs used, by step time or tokens",
                                    ["weighting"], registry=r)
        self.step_token_budget = Gauge("brownout_step_token_budget",
                                       "Token budget of the last scheduled step (rung 3: smaller "
                                       "under TPOT pressure, larger under TTFT pressure)", registry=r)
        self.running_cap = Gauge("brownout_running_cap",
                                 "Requests the running batch may hold now (rung 4: the TPOT-aware "
                                 "cap, at most --max-num-seqs)", registry=r)
        self.exempt_steps = Counter("brownout_exempt_steps",
                                    "Dimmed or shed steps that held a request of a class exempt "
                                    "from dimming, whose tokens kept their experts "
                                    "(--dim-exempt-priority)", registry=r)
        self.experts = Histogram("brownout_experts_touched",
                                 "Distinct expert slots read per step (mean over MoE layers)",
                                 buckets=EXPERT_BUCKETS, registry=r)
        self.slo_violations = Counter("brownout_slo_violations", "SLO violations seen by the controller",
                                      ["kind"], registry=r)
        self.refused_slo = Counter("brownout_requests_refused_slo",
                                   "Requests refused at arrival (429) because their first token could not "
                                   "come within the TTFT SLO (--admission-ttft-factor)", registry=r)
        self.admission_margin = Gauge("brownout_admission_margin_seconds",
                                      "Added to every predicted wait for the first token: the P90 of the "
                                      "recent prediction errors (--admission-ttft-factor)", registry=r)
        self.admission_slot_wait = Gauge("brownout_admission_slot_wait_seconds",
                                         "Predicted wait of a new request for a sequence slot (0 while one "
                                         "is free): queued requests ahead over the rate slots free at",
                                         registry=r)
        self.predicted_ttft = Gauge("brownout_predicted_ttft_seconds",
                                    "Predicted wait for the first token of a request arriving now "
                                    "(its own prompt not counted): what a router or autoscaler compares",
                                    registry=r)
        self.gc_collections = Counter("brownout_gc_collections", "Garbage collections of the engine process",
                                      ["generation"], registry=r)
        self.gc_seconds = Counter("brownout_gc_pause_seconds", "Time the engine process spent in garbage "
                                  "collection (the step loop stands still meanwhile)", ["generation"], registry=r)
        self.gc_longest = Gauge("brownout_gc_longest_pause_seconds",
                                "Longest garbage collection of the engine process so far", registry=r)
        self.engine_restarts = Counter("brownout_engine_restarts", "Times the engine process died "
                                       "and was started again", registry=r)
        self.step_latency = Histogram("brownout_step_latency_seconds", "Engine step latency",
                                      ["phase"], buckets=STEP_BUCKETS, registry=r)
        # Children exist from the start, so every series is scrapeable (at 0) before traffic.
        for metric in (self.ttft, self.itl, self.tpot, self.request_tpot, self.e2e,
                       self.queue_time, self.request_prompt_tokens, self.request_generation_tokens,
                       self.prefill_time, self.decode_time, self.inference_time,
                       self.iteration_tokens, self.running, self.waiting, self.kv_usage,
                       self.prompt_tokens, self.generation_tokens, self.preemptions,
                       self.prefix_queries, self.prefix_hits):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort", "timeout", "error"):
            self.request_success.labels(model_name, reason)
        for phase in ("prefill", "decode"):
            self.tau.labels(phase).set(1.0)
            self.step_latency.labels(phase)
        self._arrival: dict[str, float] = {}
        self._last_token: dict[str, float] = {}
        self._seen_totals: dict[str, float] = {}
        # Newer engines report prompt/generation token totals in their snapshot (prompt
        # tokens counted as prefilled, chunk by chunk); else count them from the outputs.
        self._engine_counts_tokens = False

    def _add_request_families(self, max_model_len: int) -> None:
        """vLLM's request-level histograms (names, types and labels as vLLM exports them)."""
        r, m = self.registry, ["model_name"]
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens "
                                               "processed", m, buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Number of generation "
                                                   "tokens processed", m, buckets=tokens, registry=r)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Time spent in the PREFILL "
                                      "phase (first scheduled to first token)", m,
                                      buckets=REQUEST_BUCKETS, registry=r)
        self.decode_time = Histogram("vllm:request_decode_time_seconds", "Time spent in the DECODE phase "
                                     "(first token to last token)", m, buckets=REQUEST_BUCKETS, registry=r)
        self.inference_time = Histogram("vllm:request_inference_time_seconds", "Time spent in the RUNNING "
                                        "phase (first scheduled to last token)", m,
                                        buckets=REQUEST_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total", "Number of tokens per engine step",
                                          m, buckets=ITERATION_TOKEN_BUCKETS, registry=r)

    def _observe_request(self, out: RequestOutput) -> None:
        """The finished request's token counts and phase times (those its timestamps allow)."""
        m, metrics = self._model, out.metrics
        self.request_prompt_tokens.labels(m).observe(len(out.prompt_token_ids))
        self.request_generation_tokens.labels(m).observe(len(out.output_token_ids))
        if metrics is None:
            return
        scheduled, first, last = metrics.first_scheduled_time, metrics.first_token_time, metrics.last_token_time
        for hist, start, end in ((self.prefill_time, scheduled, first), (self.decode_time, first, last),
                                 (self.inference_time, scheduled, last)):
            if start is not None and end is not None:
                hist.labels(m).observe(max(0.0, end - start))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ EngineListener
    def on_request_start(self, request_id: str, arrival_time: float) -> None:
        self._arrival[request_id] = arrival_time

    def on_request_end(self, request_id: str) -> None:
        """The client aborted a request; counted once, if it started and had not finished."""
        if request_id in self._arrival:
            self.request_success.labels(self._model, "abort").inc()
        self._forget(request_id)

    def on_engine_restart(self, num_restarts: int) -> None:
        """A fresh engine counts its totals from 0 again."""
        self.engine_restarts.inc()
        self._seen_totals.clear()

    def _forget(self, request_id: str) -> None:
        self._arrival.pop(request_id, None)
        self._last_token.pop(request_id, None)

    def on_step(self, t: float, outputs: list[RequestOutput], stats: Optional[StepStats],
                snapshot: dict) -> None:
        self._engine_counts_tokens = "generation_tokens_total" in snapshot
        for out in outputs:
            self._on_output(t, out)
        if stats is not None:
            phase = "prefill" if stats.has_prefill else "decode"
            self.step_latency.labels(phase).observe(stats.latency_s)
            self.iteration_tokens.labels(self._model).observe(stats.num_prefill_tokens + stats.num_decode_tokens)
            if stats.experts_touched:
                self.experts.observe(stats.mean_experts_touched)
        self.on_snapshot(snapshot)

    def _on_output(self, t: float, out: RequestOutput) -> None:
        rid, m = out.request_id, self._model
        if out.new_token_ids:
            if not self._engine_counts_tokens:
                self.generation_tokens.labels(m).inc(len(out.new_token_ids))
            prev = self._last_token.get(rid)
            if prev is None:  # first token: the prompt has been prefilled
                if not self._engine_counts_tokens:
                    self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                if rid in self._arrival:
                    self.ttft.labels(m).observe(max(0.0, t - self._arrival[rid]))
            else:
                gap = max(0.0, (t - prev) / len(out.new_token_ids))
                for _ in out.new_token_ids:
                    self.itl.labels(m).observe(gap)
                    self.tpot.labels(m).observe(gap)
            self._last_token[rid] = t
        if out.finished:
            self._on_finished(t, out)

    def _on_finished(self, t: float, out: RequestOutput) -> None:
        m = self._model
        arrival = self._arrival.get(out.request_id)
        metrics = out.metrics
        if metrics is not None:
            arrival = metrics.arrival_time
            if metrics.queue_time is not None:
                self.queue_time.labels(m).observe(max(0.0, metrics.queue_time))
            first, last = metrics.first_token_time, metrics.last_token_time
            n = len(out.output_token_ids)
            if first is not None and last is not None and n > 1:
                self.request_tpot.labels(m).observe(max(0.0, (last - first) / (n - 1)))
        if arrival is not None:
            self.e2e.labels(m).observe(max(0.0, t - arrival))
        self._observe_request(out)
        reason = out.finish_reason.value if out.finish_reason is not None else "stop"
        self.request_success.labels(m, reason).inc()
        self._forget(out.request_id)

    def on_snapshot(self, snapshot: dict) -> None:
        if not snapshot:
            return
        m = self._model
        self.running.labels(m).set(snapshot.get("num_running", 0))
        self.waiting.labels(m).set(snapshot.get("num_waiting", 0))
        self.kv_usage.labels(m).set(snapshot.get("kv_usage", 0.0))
        for phase in ("prefill", "decode"):
            if f"tau_{phase}" in snapshot:
                self.tau.labels(phase).set(snapshot[f"tau_{phase}"])
            if f"top_k_{phase}" in snapshot:
                self.top_k.labels(phase).set(snapshot[f"top_k_{phase}"])
        for weighting, value in (snapshot.get("accuracy_spent") or {}).items():
            self.accuracy_spent.labels(weighting.removesuffix("_weighted")).set(value)
        for key, counter in (("num_preemptions_total", self.preemptions),
                             ("prefix_cache_queries_total", self.prefix_queries),
                             ("prefix_cache_hits_total", self.prefix_hits),
                             ("prompt_tokens_total", self.prompt_tokens),
                             ("generation_tokens_total", self.generation_tokens)):
            self._advance(counter.labels(m), key, snapshot)
        self._advance(self.refused_slo, "num_refused_slo_total", snapshot)
        self._advance(self.exempt_steps, "exempt_steps_total", snapshot)
        if "step_token_budget" in snapshot:
            self.step_token_budget.set(snapshot["step_token_budget"])
        if "running_cap" in snapshot:
            self.running_cap.set(snapshot["running_cap"])
        for gen, count in (snapshot.get("gc_collections") or {}).items():
            self._advance(self.gc_collections.labels(gen), f"gc_collections/{gen}", count)
        for gen, secs in (snapshot.get("gc_seconds") or {}).items():
            self._advance(self.gc_seconds.labels(gen), f"gc_seconds/{gen}", secs)
        if "admission_margin_s" in snapshot:
            self.admission_margin.set(snapshot["admission_margin_s"])
        if "admission_slot_wait_s" in snapshot:
            self.admission_slot_wait.set(snapshot["admission_slot_wait_s"])
        if "admission_predicted_wait_s" in snapshot:
            self.predicted_ttft.set(snapshot["admission_predicted_wait_s"])
        if "gc_longest_s" in snapshot:
            self.gc_longest.set(snapshot["gc_longest_s"])
        self._engine_counts_tokens = "generation_tokens_total" in snapshot
        for kind, count in (snapshot.get("slo_violations") or {}).items():
            self.slo_violations.labels(kind)  # listed at 0 before the first violation
            self._advance(self.slo_violations.labels(kind), f"slo_violations/{kind}", count)

    def _advance(self, counter, key: str, source) -> None:
        """Move a counter to the engine's running total (the engine reports totals, not deltas)."""
        total = source.get(key) if isinstance(source, dict) else source
        if total is None:
            return
        seen = self._seen_totals.get(key, 0)
        if total > seen:
            counter.inc(total - seen)
            self._seen_totals[key] = total
