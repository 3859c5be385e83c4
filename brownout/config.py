"""Frozen, validated configuration for every part of the system.

Each dataclass checks itself in `__post_init__` and raises `ValidationError` naming the
bad field and its allowed range. No torch here: the HTTP layer imports this module. The SLO
policy names come from the controller's registry (brownout.control.base), which imports
nothing of this module at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from brownout.control.base import policy_names, unknown_policy
from brownout.types import ValidationError


def _check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValidationError(name, f"must be in {left}{lo if lo is not None else '-inf'}, "
                                    f"{hi if hi is not None else 'inf'}{right}, got {value}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.85  # fraction of GPU memory for weights + KV cache
    cpu_kv_bytes: int = 256 * 1024 * 1024  # explicit KV budget on the CPU
    num_blocks: Optional[int] = None  # override (tests force preemption with a small number)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before


    def __post_init__(self) -> None:
        _check_range("block_size", self.block_size, 1, 1024)
        _check_range("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        _check_range("cpu_kv_bytes", self.cpu_kv_bytes, 1)
        if self.num_blocks is not None:
            _check_range("num_blocks", self.num_blocks, 1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValidationError("enable_prefix_caching",
                                  f"must be true or false, got {self.enable_prefix_caching!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in one batch
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority
    max_waiting_requests: int = 1024  # admission: bounded queue
    max_waiting_tokens: int = 1_000_000  # admission: bounded queued prompt tokens
    queue_timeout_s: Optional[float] = None  # drop requests waiting longer than this
    # refuse (429) a request whose predicted wait for its first token exceeds this many
    # TTFT SLOs (None: admit while the queue has room); see brownout.engine.admission
    admission_ttft_factor: Optional[float] = None
    # plan and launch each step before the previous one is collected, its decodes' input
    # tokens taken on the device, so the host's scheduling hides behind the GPU's work (a
    # step that needs a preemption or follows one asking for logprobs, and every step of a
    # tensor-parallel engine, is still planned after the collect)
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _check_range("max_num_seqs", self.max_num_seqs, 1)
        _check_range("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.policy not in ("fcfs", "priority"):
            raise ValidationError("policy", f"must be 'fcfs' or 'priority', got {self.policy!r}")
        _check_range("max_waiting_requests", self.max_waiting_requests, 1)
        _check_range("max_waiting_tokens", self.max_waiting_tokens, 1)
        if self.queue_timeout_s is not None:
            _check_range("queue_timeout_s", self.queue_timeout_s, 0.0, lo_open=True)
        if self.admission_ttft_factor is not None:
            _check_range("admission_ttft_factor", self.admission_ttft_factor, 0.0, lo_open=True)


@dataclass(frozen=True, slots=True)
class BrownoutConfig:
    """Brownout routing. `tau` 1 keeps every expert (exact model), 0 keeps none."""

    united_experts: Optional[str] = None  # directory written by `brownout unite`
    # the rungs' accuracy prices (ladder-prices.json format); None: the one beside the united experts
    rung_prices: Optional[str] = None
    tau_prefill: float = 1.0  # initial thresholds; the SLO controller moves them
    tau_decode: float = 1.0

    def __post_init__(self) -> None:
        _check_range("tau_prefill", self.tau_prefill, 0.0, 1.0)
        _check_range("tau_decode", self.tau_decode, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class SLOConfig:
    """SLO targets and the controller's knobs (defaults are the paper's, SPEC 1.4)."""

    policy: str = "off"  # one of brownout.control.policy_names(): off | fixed | aimd | predictive
    ttft_s: float = 1.0
    tpot_s: float = 0.15
    prefill_step_s: float = 0.25
    decode_step_s: float = 0.15
    window_s: float = 2.0
    check_interval_s: float = 5.0
    shrink_factor: float = 0.8
    increase_step: float = 0.1
    warning_ratio: float = 0.8
    percentile: float = 90.0
    min_tau: float = 0.0
    # requests with priority <= this keep tau 1 and the model's k: a step holding one runs
    # undimmed (None: no class is exempt)
    dim_exempt_priority: Optional[int] = None

    def __post_init__(self) -> None:
        if self.dim_exempt_priority is not None and (
                isinstance(self.dim_exempt_priority, bool) or not isinstance(self.dim_exempt_priority, int)):
            raise ValidationError("dim_exempt_priority",
                                  f"must be an integer priority, got {self.dim_exempt_priority!r}")
        if self.policy not in policy_names():
            raise unknown_policy(self.policy)
        for name in ("ttft_s", "tpot_s", "prefill_step_s", "decode_step_s", "window_s",
                     "check_interval_s"):
            _check_range(name, getattr(self, name), 0.0, lo_open=True)
        _check_range("shrink_factor", self.shrink_factor, 0.0, 1.0, lo_open=True, hi_open=True)
        _check_range("increase_step", self.increase_step, 0.0, 1.0)
        _check_range("warning_ratio", self.warning_ratio, 0.0, 1.0, lo_open=True)
        _check_range("percentile", self.percentile, 0.0, 100.0, lo_open=True)
        _check_range("min_tau", self.min_tau, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class ModelLoadConfig:
    model: str  # directory of a HF-format checkpoint, or a preset name with load_format=dummy
    tokenizer: Optional[str] = None  # default: the model directory
    load_format: str = "auto"  # auto (safetensors) | dummy (random weights from the config)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    max_model_len: Optional[int] = None
    enforce_eager: bool = False  # no CUDA graphs
    cpu_threads: Optional[int] = None  # torch threads on the CPU (None: torch's default)
    extra_expert_slots: Optional[int] = None  # default: room for way-2 united experts
    tensor_parallel_size: int = 1  # processes (GPUs) the model is split over
    enable_expert_parallel: bool = False  # split routed experts by rank, not along their width
    # the shared expert as extra slots of the expert kernel (fewer launches a layer; one process).
    # None: on CUDA only (on the CPU the expert path loops over slots, where it adds work)
    fold_shared_expert: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValidationError("load_format", f"must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValidationError("dtype", f"must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValidationError("device", f"must be auto|cpu|cuda, got {self.device!r}")
        if self.max_model_len is not None:
            _check_range("max_model_len", self.max_model_len, 1)
        if self.cpu_threads is not None:
            _check_range("cpu_threads", self.cpu_threads, 1, 1024)
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValidationError("tensor_parallel_size", f"must be an integer >= 1, got {tp!r}")
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValidationError("enable_expert_parallel",
                                  f"must be true or false, got {self.enable_expert_parallel!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    load: ModelLoadConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    brownout: BrownoutConfig = field(default_factory=BrownoutConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # None: no auth; never empty (that would mean no auth silently)
    served_model_name: Optional[str] = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: Optional[int] = None  # default: the model's context
    max_tokens_limit: int = 4096
    # prompt tokens (or their character bound) one request may queue in all, over its prompts
    # (default: brownout.api.limits.REQUEST_CONTEXTS prompts of the largest size)
    max_request_tokens: Optional[int] = None
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    header_timeout_s: float = 10.0  # a request head must arrive within this (slow clients)
    body_timeout_s: float = 30.0  # a request body must arrive within this (4 MB at ~140 kB/s)
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests may finish within this

    def __post_init__(self) -> None:
        _check_range("port", self.port, 0, 65535)
        _check_range("max_body_bytes", self.max_body_bytes, 1)
        _check_range("max_tokens_limit", self.max_tokens_limit, 1)
        if self.max_prompt_tokens is not None:
            _check_range("max_prompt_tokens", self.max_prompt_tokens, 1)
        if self.max_request_tokens is not None:
            _check_range("max_request_tokens", self.max_request_tokens, 1)
        for name in ("keep_alive_timeout_s", "header_timeout_s", "body_timeout_s"):
            _check_range(name, getattr(self, name), 0.0, lo_open=True)
        _check_range("shutdown_timeout_s", self.shutdown_timeout_s, 0.0)
        if self.api_key is not None:
            _check_api_key(self.api_key)


def _check_api_key(key: str) -> None:
    """A key a client can send in an Authorization header and that cannot be matched by
    accident: not empty, no surrounding whitespace (headers are stripped), no control
    characters (HTTP forbids them in header values)."""
    if not isinstance(key, str) or not key:
        raise ValidationError("api_key", "must not be empty: an empty key would turn auth off; "
                                         "give no key to serve without auth")
    if key != key.strip():
        raise ValidationError("api_key", "must not start or end with whitespace")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValidationError("api_key", "must not contain control characters")
