"""`brownout serve`: build the engine and server configs from flags, then run uvicorn.

With no --model it serves the embedded demo model with its way-4 united experts, brownout
off until --slo-policy (or --fixed-tau) turns it on; the start-up log says which united
experts and policy are active. Flags left unset keep the config defaults (the SLO knobs
default to the paper's settings, see brownout.config.SLOConfig). A bad value is reported as
a CLI error naming the flag.
The API key comes from --api-key-file, the BROWNOUT_API_KEY environment variable, or
--api-key (visible to every local user in the process list, so a warning is logged); an
empty key is an error, never a silent "no auth".
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Mapping, Optional

from brownout.api.limits import REQUEST_CONTEXTS
from brownout.cliutil import add_model_arguments, flag_name, resolve_model, resolve_united, shown_path, united_summary
from brownout.config import (BrownoutConfig, CacheConfig, EngineConfig, ModelLoadConfig,
                             SchedulerConfig, ServerConfig, SLOConfig)
from brownout.control.prices import PriceTable
from brownout.types import ValidationError

logger = logging.getLogger(__name__)

API_KEY_ENV = "BROWNOUT_API_KEY"
DEFAULT_MODEL_FACTORY = "brownout.defaults:default_model_dir"

# config field -> flag, where the two names differ
_FLAG_OF_FIELD = {
    "queue_timeout_s": "--queue-timeout", "admission_ttft_factor": "--admission-ttft-factor",
    "policy": "--slo-policy", "slo_policy": "--slo-policy",
    "ttft_s": "--slo-ttft", "tpot_s": "--slo-tpot", "prefill_step_s": "--slo-prefill-step",
    "decode_step_s": "--slo-decode-step", "window_s": "--slo-window",
    "check_interval_s": "--slo-check-interval", "shrink_factor": "--slo-shrink-factor",
    "increase_step": "--slo-increase-step", "warning_ratio": "--slo-warning-ratio",
    "tau_prefill": "--fixed-tau", "tau_decode": "--fixed-tau", "num_blocks": "--num-kv-blocks",
    "united_experts": "--united-experts", API_KEY_ENV: API_KEY_ENV,
    "dim_exempt_priority": "--dim-exempt-priority", "rung_prices": "--rung-prices",
    "keep_alive_timeout_s": "--keep-alive-timeout", "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout", "shutdown_timeout_s": "--shutdown-timeout",
}

# flag dest -> ServerConfig field, for the flags that default to the config's value
_SERVER_FLAGS = {
    "max_request_tokens": "max_request_tokens", "keep_alive_timeout": "keep_alive_timeout_s",
    "header_timeout": "header_timeout_s", "body_timeout": "body_timeout_s",
    "shutdown_timeout": "shutdown_timeout_s",
}

# what each SLO flag sets, with its unit
SLO_HELP = {
    "slo_ttft": "time-to-first-token SLO, seconds",
    "slo_tpot": "time-per-output-token SLO, seconds",
    "slo_prefill_step": "latency SLO of a step with prefill work, seconds",
    "slo_decode_step": "latency SLO of a decode-only step, seconds",
    "slo_window": "span of recent steps the controller's P90 latency is taken over, seconds",
    "slo_check_interval": "seconds between two decisions of the aimd controller",
    "slo_shrink_factor": "aimd: tau is multiplied by this fraction when a P90 exceeds its SLO",
    "slo_increase_step": "aimd: tau grows by this much (of 1) when a P90 is below the warning ratio",
    "slo_warning_ratio": "aimd: fraction of an SLO below which tau grows",
}

# flag dest -> SLOConfig field
SLO_FLAGS = {
    "slo_ttft": "ttft_s", "slo_tpot": "tpot_s", "slo_prefill_step": "prefill_step_s",
    "slo_decode_step": "decode_step_s", "slo_window": "window_s",
    "slo_check_interval": "check_interval_s", "slo_shrink_factor": "shrink_factor",
    "slo_increase_step": "increase_step", "slo_warning_ratio": "warning_ratio",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    slo = SLOConfig()
    sched = SchedulerConfig()
    srv = ServerConfig()
    g = parser.add_argument_group("model")
    add_model_arguments(g)
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--rung-prices", default=None,
                   help="accuracy prices of the rungs (JSON, as `brownout eval` writes ladder-prices.json): "
                        "enables expert shedding and the accuracy-spent gauge (default: the file beside "
                        "the united experts, if any)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for weights and KV cache (default 0.85)")
    g.add_argument("--served-model-name", default=None, help="model name clients use (default: the model's)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length, in tokens (default: the model's)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: cuda when available)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of weights and activations (auto: bfloat16 on a GPU, float32 on a CPU)")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights of a preset's or checkpoint's shapes")
    g.add_argument("--enforce-eager", action="store_true", help="run without CUDA graphs")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of the engine on the CPU (default: cores - 1, leaving one core "
                        "to the HTTP process: an engine contending for every core runs far slower)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights of --load-format dummy")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many processes (GPUs)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="split routed experts by rank instead of along their width")
    g = parser.add_argument_group("scheduler and admission")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"sequences per step at most, i.e. the batch size (default {sched.max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per step at most (default {sched.max_num_batched_tokens})")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help=f"requests the queue holds; beyond it requests get 429 (default {sched.max_waiting_requests})")
    g.add_argument("--queue-timeout", type=float, default=None, help="seconds a request may wait (default: no limit)")
    g.add_argument("--admission-ttft-factor", type=float, default=None,
                   help="refuse (429) a request whose predicted wait for its first token exceeds this many "
                        "TTFT SLOs (--slo-ttft), so the admitted ones can meet it (default: admit while the "
                        "queue has room)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and launch each step before the previous one is collected, so the "
                        "host's work per step hides behind the GPU's (default: on)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: as many as the memory budget holds)")
    g.add_argument("--block-size", type=int, default=None,
                   help=f"tokens per KV block (default {CacheConfig().block_size})")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV blocks of prompt prefixes seen before (default: on)")
    g = parser.add_argument_group("brownout and SLO control")
    g.add_argument("--slo-policy", choices=("off", "fixed", "aimd", "predictive", "ladder"), default=None,
                   help=f"brownout policy: off, a fixed tau, or a controller that dims under load "
                        f"(default {slo.policy}; 'fixed' when --fixed-tau is given)")
    g.add_argument("--fixed-tau", type=float, default=None,
                   help="tau in [0, 1] of the fixed policy; the initial tau of the others (default 1)")
    g.add_argument("--dim-exempt-priority", type=int, default=None,
                   help="requests with priority <= this run undimmed (tau 1, full top-k): a step "
                        "holding one is not dimmed (default: none exempt)")
    g.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None,
                   help="queue order, refusal and preemption order: 'priority' by the request's "
                        "priority (lower first), then arrival (default fcfs)")
    for dest, name in SLO_FLAGS.items():
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=float, default=None,
                       help=f"{SLO_HELP[dest]} (default {getattr(slo, name):g})")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=srv.host, help="bind address (default 127.0.0.1: local only)")
    g.add_argument("--port", type=int, default=srv.port, help="TCP port (0: any free port)")
    key = g.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every path but /health and /metrics; "
                          f"visible in the process list: prefer {API_KEY_ENV} or --api-key-file (default: none, "
                          "no auth unless one of those gives a key)")
    key.add_argument("--api-key-file", default=None,
                     help=f"read the API key from this file (default: the {API_KEY_ENV} environment "
                          "variable, if set)")
    g.add_argument("--max-body-bytes", type=int, default=srv.max_body_bytes,
                   help="largest request body, in bytes; 413 beyond")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt, in tokens (default: the context length - 1)")
    g.add_argument("--max-request-tokens", type=int, default=None,
                   help="prompt tokens one request may queue over all its prompts (text counted at "
                        f"the most characters per token; default: {REQUEST_CONTEXTS} x the largest prompt)")
    g.add_argument("--max-tokens-limit", type=int, default=srv.max_tokens_limit,
                   help="largest max_tokens a request may ask for, in tokens; a chat request without "
                        "max_tokens runs up to it (or the context)")
    g.add_argument("--keep-alive-timeout", type=float, default=None,
                   help=f"seconds an idle keep-alive connection stays open (default {srv.keep_alive_timeout_s:g})")
    g.add_argument("--header-timeout", type=float, default=None,
                   help=f"seconds a request's headers may take to arrive (default {srv.header_timeout_s:g})")
    g.add_argument("--body-timeout", type=float, default=None,
                   help=f"seconds a request's body may take to arrive; 408 after (default {srv.body_timeout_s:g})")
    g.add_argument("--shutdown-timeout", type=float, default=None,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are ended "
                        f"(new ones get 503 meanwhile; default {srv.shutdown_timeout_s:g})")
    g.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)  # test seam


def _given(args, mapping: dict[str, str]) -> dict:
    return {field: getattr(args, dest) for dest, field in mapping.items()
            if getattr(args, dest, None) is not None}


def build_configs(args, environ: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """Configs from parsed flags (and the environment, for the API key); raises
    ValidationError naming the bad field."""
    policy = args.slo_policy or ("fixed" if args.fixed_tau is not None else SLOConfig().policy)
    if policy == "fixed" and args.fixed_tau is None:
        raise ValidationError("fixed_tau", "the fixed policy needs --fixed-tau in [0, 1]")
    tau = {} if args.fixed_tau is None else {"tau_prefill": args.fixed_tau, "tau_decode": args.fixed_tau}
    dummy = args.load_format == "dummy"
    model = None if args.model is None else resolve_model(args.model, dummy=dummy)
    united = None if dummy and args.united_experts is None else \
        resolve_united(args.united_experts, model or resolve_model(None))
    rung_prices = args.rung_prices
    if rung_prices is not None:  # absolute, so an engine in another process finds it
        if not Path(rung_prices).is_file():
            raise ValidationError("rung_prices", f"expected a price table file (ladder-prices.json), got {rung_prices}")
        try:
            PriceTable.load(Path(rung_prices))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError("rung_prices", f"{rung_prices} is not a price table ({exc!r})") from exc
        rung_prices = str(Path(rung_prices).resolve())
    load = ModelLoadConfig(model=model or "", load_format=args.load_format, dtype=args.dtype,
                           device=args.device, seed=args.seed, max_model_len=args.max_model_len,
                           enforce_eager=args.enforce_eager, tokenizer=args.tokenizer,
                           tensor_parallel_size=args.tensor_parallel_size,
                           enable_expert_parallel=args.enable_expert_parallel,
                           cpu_threads=args.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    cache = CacheConfig(**_given(args, {"num_kv_blocks": "num_blocks", "block_size": "block_size",
                                        "gpu_memory_utilization": "gpu_memory_utilization",
                                        "enable_prefix_caching": "enable_prefix_caching"}))
    scheduler = SchedulerConfig(**_given(args, {
        "max_num_seqs": "max_num_seqs", "max_num_batched_tokens": "max_num_batched_tokens",
        "max_waiting_requests": "max_waiting_requests", "queue_timeout": "queue_timeout_s",
        "admission_ttft_factor": "admission_ttft_factor", "scheduling_policy": "policy",
        "async_scheduling": "async_scheduling"}))
    engine = EngineConfig(load=load, cache=cache, scheduler=scheduler,
                          brownout=BrownoutConfig(united_experts=united, rung_prices=rung_prices, **tau),
                          slo=SLOConfig(policy=policy, **_given(args, {**SLO_FLAGS,
                                                                       "dim_exempt_priority": "dim_exempt_priority"})))
    key, source = api_key(args, environ)
    try:
        server = ServerConfig(host=args.host, port=args.port, api_key=key,
                              served_model_name=args.served_model_name,
                              max_body_bytes=args.max_body_bytes,
                              max_prompt_tokens=args.max_prompt_tokens,
                              max_tokens_limit=args.max_tokens_limit, **_given(args, _SERVER_FLAGS))
    except ValidationError as exc:
        if exc.field == "api_key":  # name where the key came from
            raise ValidationError(source, exc.message) from None
        raise
    return engine, server


def api_key(args, environ: Mapping[str, str]) -> tuple[Optional[str], str]:
    """(the API key or None, the field naming its source: api_key, api_key_file or the
    environment variable)."""
    if args.api_key is not None:
        logger.warning("--api-key is visible to every local user in the process list; "
                       "prefer %s or --api-key-file", API_KEY_ENV)
        return args.api_key, "api_key"
    if args.api_key_file is not None:
        try:
            text = Path(args.api_key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError("api_key_file", f"cannot read {args.api_key_file}: {exc}") from None
        return text.strip(), "api_key_file"  # a file ends with a newline
    if API_KEY_ENV in environ:
        return environ[API_KEY_ENV], API_KEY_ENV
    return None, "api_key"


def flag_of(field: str) -> str:
    return _FLAG_OF_FIELD.get(field, flag_name(field))


def brownout_summary(engine: EngineConfig) -> str:
    """One line: the united experts and policy the server runs with, and, while brownout is
    off, the flags that turn it on."""
    united, slo = engine.brownout.united_experts, engine.slo
    turn_on = "--slo-policy predictive (or aimd, or --fixed-tau T)"
    if united is None:
        add = "--united-experts DIR (written by `brownout unite`) or --united-experts average:4"
        if slo.policy == "off":
            return f"brownout is off: no united experts; to turn it on: {add}, with {turn_on}"
        return f"brownout stays off: --slo-policy {slo.policy} needs united experts; add {add}"
    what = f"united experts {united_summary(united)}"
    if slo.policy == "off":
        return f"brownout is off (--slo-policy off); {what} loaded; to turn it on: {turn_on}"
    if slo.policy == "fixed":
        return f"brownout on: fixed tau {engine.brownout.tau_decode:g}, {what}"
    return (f"brownout on: policy {slo.policy} (TTFT SLO {slo.ttft_s:g} s, TPOT SLO {slo.tpot_s:g} s), "
            f"{what}")


def run(args) -> int:
    # imported only when serving: keeps `brownout --help` free of uvicorn and fastapi
    from brownout.api.server import create_app
    from brownout.api.serving import serve
    from brownout.api.engine_client import EngineClient
    from brownout.engine.worker import DEFAULT_ENGINE_FACTORY, WorkerOptions

    engine_config, server_config = build_configs(args)  # a ValidationError: `brownout.cli.main` names its flag
    logger.info("model %s; %s", shown_path(engine_config.load.model or resolve_model(None)),
                brownout_summary(engine_config))
    options = WorkerOptions(engine_factory=args.engine_factory or DEFAULT_ENGINE_FACTORY,
                            max_prompt_tokens=server_config.max_prompt_tokens,
                            default_model_factory=None if args.model else DEFAULT_MODEL_FACTORY,
                            log_level=logging.getLogger().getEffectiveLevel())
    client = EngineClient(engine_config, options)
    app = create_app(client, server_config)
    return serve(app, server_config, app.state.server_state.drain, client)
