"""Offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `LLM.chat`.

Drives the same `LLMEngine` the server runs, to completion, and returns whole outputs.
`LLM(..., tensor_parallel_size=N, enable_expert_parallel=True)` splits the model over N
processes; `close()` (or a `with` block) stops them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from brownout.config import (BrownoutConfig, CacheConfig, EngineConfig, ModelLoadConfig,
                             SchedulerConfig, ServerConfig, SLOConfig)
from brownout.defaults import default_model_dir
from brownout.engine.llm_engine import LLMEngine
from brownout.types import FinishReason, Logprob, SamplingParams, ValidationError


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: Optional[FinishReason]
    logprobs: list[Logprob]
    prompt_logprobs: Optional[list[Optional[Logprob]]]


class LLM:
    def __init__(self, model: Optional[str] = None, *, united_experts: Optional[str] = None,
                 tau: float = 1.0, load_format: str = "auto", device: str = "auto",
                 dtype: str = "auto", seed: int = 0, max_model_len: Optional[int] = None,
                 tokenizer: Optional[str] = None, enforce_eager: bool = False,
                 cache: Optional[CacheConfig] = None, scheduler: Optional[SchedulerConfig] = None,
                 tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 fold_shared_expert: Optional[bool] = None):
        load = ModelLoadConfig(model=model or default_model_dir(), load_format=load_format,
                               device=device, dtype=dtype, seed=seed, max_model_len=max_model_len,
                               tokenizer=tokenizer, enforce_eager=enforce_eager,
                               tensor_parallel_size=tensor_parallel_size,
                               enable_expert_parallel=enable_expert_parallel,
                               fold_shared_expert=fold_shared_expert)
        policy = "fixed" if tau < 1.0 else "off"
        self.engine = LLMEngine(EngineConfig(
            load=load, cache=cache or CacheConfig(), scheduler=scheduler or SchedulerConfig(),
            brownout=BrownoutConfig(united_experts=united_experts, tau_prefill=tau, tau_decode=tau),
            slo=SLOConfig(policy=policy)))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel engine."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Union[str, Sequence[Union[str, list[int]]]],
                 params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[Completion]:
        """Complete each prompt; `params` is one SamplingParams for all, or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValidationError("params", f"got {len(params)} SamplingParams for {len(prompts)} prompts; "
                                            "pass one, or one per prompt")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             params: Optional[SamplingParams] = None) -> list[Completion]:
        """Answer each conversation. Without `params` a reply runs until it ends, as the server's
        chat endpoint lets one run when a request sets no max_tokens: up to the context left
        after the prompt, at most `ServerConfig.max_tokens_limit` tokens."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.apply_chat_template(c) for c in convs]
        if params is None:
            limit = ServerConfig().max_tokens_limit
            params = [SamplingParams(max_tokens=max(1, min(limit, self.engine.max_model_len - len(p))))
                      for p in prompts]
        return self.generate(prompts, params)

    def _run(self, ids: list[str]) -> list[Completion]:
        results: dict[str, Completion] = {}
        texts = {rid: [] for rid in ids}
        logprobs = {rid: [] for rid in ids}
        prompt_lps: dict[str, Optional[list]] = {rid: None for rid in ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.new_text)
                logprobs[out.request_id].extend(out.new_logprobs)
                if out.prompt_logprobs is not None:
                    prompt_lps[out.request_id] = out.prompt_logprobs
                if out.finished:
                    results[out.request_id] = Completion(
                        out.request_id, out.prompt_token_ids, out.output_token_ids,
                        "".join(texts[out.request_id]), out.finish_reason,
                        logprobs[out.request_id], prompt_lps[out.request_id])
        return [results[rid] for rid in ids]
