"""The GPU headline runs as simulation inputs: workload, server flags and SLOs of a run.

`headline_setup(gpu, run, policy, profile, trace)` reads the run's committed headline.json
(workload spec, calibrated SLOs, server flags) and returns the workload spec with the trace
path replaced by `trace` and the `SimSetup` its servers ran with. The headline servers ran
`--slo-window 2 --slo-check-interval 1` (benchmarks/headline.py), which headline.json does
not record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from brownout.config import SchedulerConfig, SLOConfig
from brownout.control.prices import PriceTable
from brownout.sim.profile import StepCostProfile
from brownout.sim.run import SimSetup

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
HEADLINE_SLO_WINDOW_S = 2.0
HEADLINE_CHECK_INTERVAL_S = 1.0
# server flags a simulated engine takes, and the SchedulerConfig fields they set
_SCHED_FLAGS = {"--max-num-seqs": "max_num_seqs", "--max-num-batched-tokens": "max_num_batched_tokens",
                "--max-waiting-requests": "max_waiting_requests",
                "--admission-ttft-factor": "admission_ttft_factor", "--queue-timeout": "queue_timeout_s"}


def headline(gpu: str, run: int) -> dict:
    return json.loads((RESULTS / "headline" / "raw" / f"headline_{gpu}_run{run}" / "headline.json").read_text())


def headline_setup(gpu: str, run: int, policy: str, profile: StepCostProfile, trace: str | Path,
                   seed: int = 0) -> tuple[str, SimSetup]:
    h = headline(gpu, run)
    workload = re.sub(r"path=[^,]*", f"path={trace}", h["workload"])
    flags = h["server_flags"]
    values = {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f.startswith("--")}
    sched = {field: float(values[f]) if field in ("admission_ttft_factor", "queue_timeout_s")
             else int(values[f]) for f, field in _SCHED_FLAGS.items() if f in values}
    cal = h["calibration"]
    slo = SLOConfig(policy=policy, ttft_s=cal["slo_ttft_s"], tpot_s=cal["slo_tpot_s"],
                    prefill_step_s=cal["slo_prefill_step_s"], decode_step_s=cal["slo_decode_step_s"],
                    window_s=HEADLINE_SLO_WINDOW_S, check_interval_s=HEADLINE_CHECK_INTERVAL_S)
    max_len = int(values["--max-model-len"]) if "--max-model-len" in values else None
    # a price table the servers read (--rung-prices, a path in the repository): shedding and
    # the accuracy spent are simulated with the same prices
    prices = PriceTable.load(ROOT / values["--rung-prices"]) if "--rung-prices" in values else None
    return workload, SimSetup(profile, SchedulerConfig(**sched), slo, max_len, seed, prices=prices)


def measured_rows(gpu: str, run: int) -> dict[str, dict]:
    """The headline run's comparison rows by policy."""
    return {r["policy"]: r for r in headline(gpu, run)["rows"]}
