"""The prefill-heavy workload as a trace file, so `benchmarks/headline.py` (and `brownout
bench` / `brownout simulate` with `trace:path=...`) replay it like the conversation trace.

Arrivals are gamma renewals (burstiness 0.5: CV sqrt(2), burstier than Poisson) at one request
per trace second; prompt and output lengths are log-normal around 2,000 and 30 tokens. The
replay's `speedup` sets the offered rate, so the headline calibration scales it to its base
load exactly as it scales the conversation trace.

  python benchmarks/prefill_heavy_trace.py --out /tmp/prefill_heavy.csv [--seed 0]

Columns: TIMESTAMP (seconds), ContextTokens, GeneratedTokens (the Azure trace's format).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

MEAN_PROMPT = 2000  # tokens: a long system prompt or retrieved document per request
PROMPT_SIGMA = 0.5  # of log(prompt tokens)
MEAN_OUTPUT = 30  # tokens: classification, extraction, short answers
OUTPUT_SIGMA = 0.5  # of log(output tokens)
BURSTINESS = 0.5  # gamma shape of the gaps (vLLM's definition; 1 is Poisson)
RATE = 1.0  # requests per trace second; the replay's speedup scales it
DURATION_S = 3600.0  # trace seconds, as long as the conversation trace's hour
MAX_PROMPT = 4000  # tokens: the headline server's context is 4096


def rows(seed: int, duration: float = DURATION_S) -> list[tuple[float, int, int]]:
    """(time s, prompt tokens, output tokens) of every request, in time order."""
    rng = np.random.default_rng(seed)
    n = int(RATE * duration * 1.5) + 16
    times = np.cumsum(rng.gamma(BURSTINESS, 1.0 / (RATE * BURSTINESS), size=n))
    times = times[times < duration]

    def lognormal(mean: float, sigma: float) -> np.ndarray:
        return rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, size=times.size)

    prompts = np.clip(np.round(lognormal(MEAN_PROMPT, PROMPT_SIGMA)), 1, MAX_PROMPT).astype(int)
    outputs = np.maximum(1, np.round(lognormal(MEAN_OUTPUT, OUTPUT_SIGMA))).astype(int)
    return [(round(float(t), 4), int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with args.out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        w.writerows(rows(args.seed))


if __name__ == "__main__":
    main()
