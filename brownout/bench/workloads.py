"""Arrival processes for load benchmarks (seeded numpy), and the workload SPEC parser.

A workload is a list of `Arrival(send_time_s, prompt_len, output_len)`, times in seconds
from the start of the run, lengths as hints (None when the process has no opinion).
SPEC strings, `KIND:key=value,key=value`:
  constant:rate=R,duration=S            one request every 1/R s
  poisson:rate=R,duration=S             exponential gaps
  gamma:rate=R,burstiness=B,duration=S  gamma gaps, shape B, scale 1/(R*B) (vLLM's
                                        definition: mean rate R, CV 1/sqrt(B); B=1 is Poisson)
  step:rate=R,factor=F,at=T,duration=S[,until=T2,burstiness=B]
                                        rate R before T, R*F from T (until T2, then R)
  ramp:start=R0,end=R1,duration=S       Poisson, rate linear from R0 to R1
  trace:path=P[,speedup=X,start=T0,duration=S,max_prompt=N,max_output=N]
        replay a CSV with columns TIMESTAMP,ContextTokens,GeneratedTokens (Azure LLM
        inference trace format; TIMESTAMP a date-time or seconds). `start` is an offset
        into the trace in trace seconds; the trace plays `speedup` times faster; `duration`
        is the run length in seconds after speed-up (trace seconds covered:
        duration * speedup). `burst=F,burst_at=T1,burst_until=T2` plays the trace F times
        faster again between run seconds T1 and T2: a step burst of real arrivals.
Every spec takes `max_requests=N` (keep the first N arrivals).
"""

from __future__ import annotations

import csv
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from brownout.types import ValidationError


class Arrival(NamedTuple):
    send_time_s: float
    prompt_len: Optional[int] = None
    output_len: Optional[int] = None


def parse_spec(spec: str, what: str = "workload") -> tuple[str, dict[str, str]]:
    """'kind:k=v,k=v' -> ('kind', {'k': 'v'}). Values stay strings."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValidationError(what, "must be a non-empty spec string like 'poisson:rate=4'")
    kind, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValidationError(what, f"expected key=value, got {item!r} in {spec!r}")
        params[key.strip()] = value.strip()
    return kind.strip().lower(), params


def _gamma_times(rate: float, duration: float, burstiness: float,
                 rng: np.random.Generator, t0: float = 0.0) -> np.ndarray:
    """Arrival times in [t0, t0 + duration) of a renewal process with gamma gaps."""
    if rate <= 0 or duration <= 0:
        return np.empty(0)
    scale = 1.0 / (rate * burstiness)
    chunks, total = [], 0.0
    expected = int(rate * duration * 1.2) + 16
    while total < duration:
        gaps = rng.gamma(burstiness, scale, size=expected)
        times = total + np.cumsum(gaps)
        chunks.append(times)
        total = float(times[-1])
    times = np.concatenate(chunks)
    return t0 + times[times < duration]


def constant_arrivals(rate: float, duration: float) -> list[Arrival]:
    n = math.ceil(rate * duration - 1e-9)
    return [Arrival(i / rate) for i in range(n)]


def poisson_arrivals(rate: float, duration: float, rng: np.random.Generator) -> list[Arrival]:
    return gamma_arrivals(rate, duration, 1.0, rng)


def gamma_arrivals(rate: float, duration: float, burstiness: float,
                   rng: np.random.Generator) -> list[Arrival]:
    return [Arrival(float(t)) for t in _gamma_times(rate, duration, burstiness, rng)]


def step_arrivals(rate: float, factor: float, at: float, duration: float,
                  rng: np.random.Generator, burstiness: float = 1.0,
                  until: Optional[float] = None) -> list[Arrival]:
    """Rate `rate` before `at`, `rate * factor` from `at` to `until` (default: the end),
    then `rate` again."""
    at = min(max(at, 0.0), duration)
    until = duration if until is None else min(max(until, at), duration)
    before = _gamma_times(rate, at, burstiness, rng)
    burst = _gamma_times(rate * factor, until - at, burstiness, rng, t0=at)
    after = _gamma_times(rate, duration - until, burstiness, rng, t0=until)
    return [Arrival(float(t)) for t in np.concatenate([before, burst, after])]


def ramp_arrivals(start: float, end: float, duration: float,
                  rng: np.random.Generator) -> list[Arrival]:
    """Poisson with rate linear from `start` to `end`, by time-rescaling unit-rate events."""
    slope = (end - start) / duration
    total = start * duration + 0.5 * slope * duration ** 2  # expected count, Lambda(duration)
    out, s = [], 0.0
    while True:
        s += rng.exponential(1.0)
        if s >= total:
            return out
        # invert Lambda(t) = start*t + slope*t^2/2 = s (stable form, also for slope < 0)
        out.append(Arrival(float(2 * s / (start + math.sqrt(max(start * start + 2 * slope * s, 0.0))))))


def _parse_timestamp(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    base, _, frac = text.partition(".")
    stamp = datetime.fromisoformat(base)
    if stamp.tzinfo is None:  # naive stamps: read as UTC so no DST shift enters the gaps
        stamp = stamp.replace(tzinfo=timezone.utc)
    seconds = stamp.timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def read_trace(path: str | Path) -> list[tuple[float, int, int]]:
    """(seconds since the first row, context tokens, generated tokens), sorted by time."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError("trace.path", f"no such file: {path}")
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= set(reader.fieldnames or []):
            raise ValidationError("trace.path", f"{path} needs columns {sorted(need)}, "
                                                f"has {reader.fieldnames}")
        for row in reader:
            rows.append((_parse_timestamp(row["TIMESTAMP"]), int(float(row["ContextTokens"])),
                         int(float(row["GeneratedTokens"]))))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])  # stable: equal stamps keep file order
    t0 = rows[0][0]
    return [(t - t0, c, g) for t, c, g in rows]


def _trace_clock(speedup: float, burst: float, burst_at: Optional[float],
                 burst_until: Optional[float]):
    """Map trace seconds (from the window start) to run seconds; the trace plays `speedup`
    times faster, and `burst` times faster again between run times burst_at and burst_until."""
    if burst_at is None or burst == 1.0:
        return lambda tau: tau / speedup
    at_tau = burst_at * speedup
    until_tau = at_tau + ((burst_until if burst_until is not None else math.inf) - burst_at) * speedup * burst

    def clock(tau: float) -> float:
        if tau < at_tau:
            return tau / speedup
        if tau < until_tau:
            return burst_at + (tau - at_tau) / (speedup * burst)
        return burst_until + (tau - until_tau) / speedup
    return clock


def trace_arrivals(path: str | Path, speedup: float = 1.0, start: float = 0.0,
                   duration: Optional[float] = None, max_prompt: Optional[int] = None,
                   max_output: Optional[int] = None, burst: float = 1.0,
                   burst_at: Optional[float] = None, burst_until: Optional[float] = None) -> list[Arrival]:
    clock = _trace_clock(speedup, burst, burst_at, burst_until)
    end = math.inf if duration is None else duration
    out = []
    for t, ctx, gen in read_trace(path):
        if t < start:
            continue
        run_t = clock(t - start)
        if run_t >= end:
            break
        ctx = max(1, min(ctx, max_prompt) if max_prompt else ctx)
        gen = max(1, min(gen, max_output) if max_output else gen)
        out.append(Arrival(run_t, ctx, gen))
    return out


# kind -> (builder(params, rng), {key: (type, default or REQUIRED)})
REQUIRED = object()
_KINDS: dict[str, tuple[Callable, dict]] = {
    "constant": (lambda p, rng: constant_arrivals(p["rate"], p["duration"]),
                 {"rate": (float, REQUIRED), "duration": (float, 60.0)}),
    "poisson": (lambda p, rng: poisson_arrivals(p["rate"], p["duration"], rng),
                {"rate": (float, REQUIRED), "duration": (float, 60.0)}),
    "gamma": (lambda p, rng: gamma_arrivals(p["rate"], p["duration"], p["burstiness"], rng),
              {"rate": (float, REQUIRED), "burstiness": (float, 1.0), "duration": (float, 60.0)}),
    "step": (lambda p, rng: step_arrivals(p["rate"], p["factor"], p["at"], p["duration"], rng,
                                          p["burstiness"], p["until"]),
             {"rate": (float, REQUIRED), "factor": (float, 2.0), "at": (float, REQUIRED),
              "duration": (float, 60.0), "until": (float, None), "burstiness": (float, 1.0)}),
    "ramp": (lambda p, rng: ramp_arrivals(p["start"], p["end"], p["duration"], rng),
             {"start": (float, REQUIRED), "end": (float, REQUIRED), "duration": (float, 60.0)}),
    "trace": (lambda p, rng: trace_arrivals(p["path"], p["speedup"], p["start"], p["duration"],
                                            p["max_prompt"], p["max_output"], p["burst"],
                                            p["burst_at"], p["burst_until"]),
              {"path": (str, REQUIRED), "speedup": (float, 1.0), "start": (float, 0.0),
               "duration": (float, None), "max_prompt": (int, None), "max_output": (int, None),
               "burst": (float, 1.0), "burst_at": (float, None), "burst_until": (float, None)}),
}
_POSITIVE = {"rate", "duration", "burstiness", "speedup", "max_prompt", "max_output", "burst"}
_NON_NEGATIVE = {"factor", "at", "until", "burst_at", "burst_until", "start", "end", "max_requests"}


def _typed(kind: str, raw: dict[str, str]) -> dict:
    schema = dict(_KINDS[kind][1], max_requests=(int, None))
    unknown = set(raw) - set(schema)
    if unknown:
        raise ValidationError(f"workload.{sorted(unknown)[0]}",
                              f"unknown key for {kind!r}; allowed: {', '.join(schema)}")
    out = {}
    for key, (typ, default) in schema.items():
        if key not in raw:
            if default is REQUIRED:
                raise ValidationError(f"workload.{key}", f"required for {kind!r}")
            out[key] = default
            continue
        try:
            value = typ(raw[key]) if typ is not int else int(float(raw[key]))
        except ValueError:
            raise ValidationError(f"workload.{key}", f"must be a {typ.__name__}, got {raw[key]!r}")
        if (key in _POSITIVE and not value > 0) or (key in _NON_NEGATIVE and value < 0) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise ValidationError(f"workload.{key}", f"must be {'> 0' if key in _POSITIVE else '>= 0'}"
                                                     f" and finite, got {value}")
        out[key] = value
    if kind == "ramp" and out["start"] == 0 and out["end"] == 0:
        raise ValidationError("workload.end", "ramp needs a non-zero rate somewhere")
    return out


def make_workload(spec: str, seed: int = 0) -> list[Arrival]:
    """Arrivals for a workload SPEC string (see the module docstring)."""
    kind, raw = parse_spec(spec, "workload")
    if kind not in _KINDS:
        raise ValidationError("workload", f"unknown kind {kind!r}; allowed: {', '.join(_KINDS)}")
    params = _typed(kind, raw)
    arrivals = _KINDS[kind][0](params, np.random.default_rng(seed))
    if params["max_requests"] is not None:
        arrivals = arrivals[:params["max_requests"]]
    return arrivals
