"""`brownout simulate`: a bench run against a simulated engine, on a virtual clock.

  brownout simulate --workload "trace:path=T.csv,speedup=2.7,duration=60,burst=2,burst_at=20,burst_until=40" \
      --slo-policy off,aimd,predictive --profile h200 --out runs/sim [--seed 0]
      [--max-num-seqs 128 --max-num-batched-tokens 1024 --admission-ttft-factor 1.0]
      [--slo-ttft 0.1 --slo-tpot 0.02 --slo-prefill-step 0.024 --slo-decode-step 0.013]
      [--prices brownout/assets/demo/ladder-prices.json --scheduling-policy priority
       --dim-exempt-priority 0]
Each policy's run goes to --out/<policy> with the files of `brownout bench` (meta.json,
requests.jsonl, metrics.jsonl, report.json/.md, plots); with several policies,
comparison.json/.md and overlay plots go to --out. Every number is a simulation: the
engine's scheduler, admission and controller run as they are, and each step's latency is
drawn from the step-cost profile (`brownout.sim.profile`) measured on the profile's GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from brownout.api.launch import SLO_FLAGS, SLO_HELP, flag_of  # noqa: F401  (flag_of: for cli)
from brownout.bench.report import compare_runs
from brownout.cliutil import int_at_least
from brownout.config import SchedulerConfig, SLOConfig
from brownout.control import policy_names
from brownout.control.prices import PriceTable
from brownout.sim.fleet import ROUTERS
from brownout.sim.profile import load_profile
from brownout.sim.run import SimSetup, simulate
from brownout.types import ValidationError

log = logging.getLogger(__name__)

# the controllers log a decision line every few virtual seconds; a simulation runs hundreds
# of those seconds per real one, so they are quiet unless --verbose asks for them
CONTROL_LOGGER = "brownout.control"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True,
                   help="arrival SPEC, as for `brownout bench` (rates in requests/s, times in seconds)")
    p.add_argument("--prompts", default="synthetic", help="prompt SPEC (default: synthetic)")
    p.add_argument("--slo-policy", dest="policy", default="off,aimd,predictive",
                   help=f"SLO policies to simulate, comma-separated ({'|'.join(policy_names())})")
    p.add_argument("--policy", dest="policy", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # former name
    p.add_argument("--profile", default="h200", help="step-cost profile: a shipped name or a JSON file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals, prompts and step costs")
    p.add_argument("--max-tokens", type=int_at_least(1),
                   help="cap on max_tokens of every request, in tokens (default: the prompt SPEC's)")
    p.add_argument("--max-model-len", type=int_at_least(2), default=None,
                   help="context length, in tokens (default: the profile's)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    d = SchedulerConfig()
    g = p.add_argument_group("server flags (as `brownout serve` takes them)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="sequences per step at most, i.e. the batch size")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per step at most")
    g.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                   help="requests the queue holds; beyond it requests get 429")
    g.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait (default: no limit)")
    g.add_argument("--admission-ttft-factor", type=float, default=None,
                   help="refuse a request whose predicted wait for its first token exceeds this many "
                        "TTFT SLOs (default: admit while the queue has room)")
    s = SLOConfig()
    for dest, field in SLO_FLAGS.items():  # the SLO flags of `brownout serve`, same help
        g.add_argument("--" + dest.replace("_", "-"), type=float, default=getattr(s, field),
                       help=SLO_HELP[dest])
    g.add_argument("--fixed-tau", type=float, default=1.0, help="tau in [0, 1] of the `fixed` policy")
    g.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=d.policy,
                   help=f"queue, refusal and preemption order (default {d.policy})")
    g.add_argument("--dim-exempt-priority", type=int, default=None,
                   help="requests with priority <= this run undimmed (default: none exempt)")
    p.add_argument("--prices", default=None,
                   help="rung price table (JSON, ladder-prices.json format): expert shedding and the "
                        "accuracy spent (default: none, so no shedding and no accuracy spent)")
    p.add_argument("--replicas", type=int_at_least(1), default=1, help="engines behind a router")
    p.add_argument("--router", default="least_loaded", choices=ROUTERS,
                   help="how the router picks a replica for each request")


def setup_from_args(args: argparse.Namespace, policy: str) -> SimSetup:
    sched = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_waiting_requests=args.max_waiting_requests,
                            queue_timeout_s=args.queue_timeout,
                            admission_ttft_factor=args.admission_ttft_factor,
                            policy=args.scheduling_policy)
    slo = SLOConfig(policy=policy, dim_exempt_priority=args.dim_exempt_priority,
                    **{field: getattr(args, dest) for dest, field in SLO_FLAGS.items()})
    prices = PriceTable.load(Path(args.prices)) if args.prices else None
    return SimSetup(load_profile(args.profile), sched, slo, args.max_model_len, args.seed,
                    args.fixed_tau, args.replicas, args.router, prices)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        logging.getLogger(CONTROL_LOGGER).setLevel(logging.WARNING)
    policies = [x for x in (s.strip() for s in args.policy.split(",")) if x]
    try:
        load_profile(args.profile)
    except (FileNotFoundError, ValueError) as e:
        raise ValidationError("--profile", f"expected a shipped profile name or a JSON file: {e}") from None
    try:
        dirs = []
        for policy in policies:
            setup = setup_from_args(args, policy)
            out = Path(args.out) / policy if len(policies) > 1 else Path(args.out)
            report = simulate(args.workload, out, setup, prompts=args.prompts, label=policy,
                              max_tokens=args.max_tokens, plots=not args.no_plots)
            dirs.append(out)
            print(f"{policy}: {report['violations']['any']['count']} violation windows, goodput "
                  f"{report['goodput_req_s']:.2f} req/s, {report['num_rejected']} refused, "
                  f"mean tau {report['tau']['mean']:.2f} (simulated, profile "
                  f"{setup.profile.machine} {setup.profile.date})")
        if len(dirs) > 1:
            compare_runs(dirs, args.out, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                         baseline_label=policies[0], plots=not args.no_plots)
            print(f"wrote {Path(args.out) / 'comparison.md'}")
    except ValidationError:
        raise  # `brownout.cli.main` prints it naming its flag
    except (FileNotFoundError, ValueError) as e:  # a profile or trace that is missing or bad
        print(f"{getattr(args, '_prog', 'brownout simulate')}: error: {e}", file=sys.stderr)
        return 2
    return 0
