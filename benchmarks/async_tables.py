"""Tables of async scheduling from one `bench_engine.py` run: decode steps launched one at a
time (`ModelRunner.execute`) vs pipelined (each launched before the previous is collected),
the engine loop's decode period and a queue's wall time with async scheduling on and off,
and the brownout steps' pipelined period by tau, each against its roofline.

Usage: python benchmarks/async_tables.py RAW_DIR --out MD [--title TEXT]
RAW_DIR holds the stages' JSON files (decode.json, loop.json, brownout.json[.gz], meta.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

# the issue's decode targets: (batch, context) -> step / roofline at most this
DECODE_TARGETS = {(1, 512): 1.5, (8, 512): 1.4, (64, 512): 1.25, (64, 2048): 1.2}


def _load(raw: Path, name: str):
    for path, opener in ((raw / name, open), (raw / (name + ".gz"), gzip.open)):
        if path.exists():
            with opener(path, "rt") as f:
                return json.load(f)
    return None


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def decode_table(rows: list[dict]) -> list[str]:
    out = ["| batch, context | one at a time ms | / roofline | pipelined ms | / roofline | pipelined / one at a time | "
           "graph replay alone ms | target |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["ctx"], r["batch"])):
        if not r.get("cuda_graph") or r.get("pipelined_ms") is None:
            continue
        p, roof = r["pipelined_ms"], r["roofline_ms"]
        target = DECODE_TARGETS.get((r["batch"], r["ctx"]))
        out.append(f"| {r['batch']}, {r['ctx']} | {r['step_ms']:.2f} | {r['ratio']:.2f}x | {p:.2f} | "
                   f"{p / roof:.2f}x | {p / r['step_ms']:.3f} | {_f(r.get('replay_ms'))} | "
                   f"{f'<= {target}x' if target else '-'} |")
    return out


def loop_tables(rows: list[dict]) -> list[str]:
    steady = [r for r in rows if r.get("kind") != "queue"]
    queue = [r for r in rows if r.get("kind") == "queue"]
    out = []
    if steady:
        out += ["| batch | async ms | / roofline | P90 ms | sync ms | / roofline | P90 ms | async / sync | steps timed |",
                "|---|---|---|---|---|---|---|---|---|"]
        for B in sorted({r["batch"] for r in steady}):
            on = next(r for r in steady if r["batch"] == B and r["async_scheduling"])
            off = next(r for r in steady if r["batch"] == B and not r["async_scheduling"])
            out.append(f"| {B} | {on['period_ms']:.2f} | {on['ratio']:.2f}x | {on['period_p90_ms']:.2f} | "
                       f"{off['period_ms']:.2f} | {off['ratio']:.2f}x | {off['period_p90_ms']:.2f} | "
                       f"{on['period_ms'] / off['period_ms']:.3f} | {on['decode_steps_timed']} |")
    if queue:
        on = next(r for r in queue if r["async_scheduling"])
        off = next(r for r in queue if not r["async_scheduling"])
        out += ["", f"A queue: {on['requests']} requests of {on['prompt']} prompt tokens and {on['output']} "
                f"output tokens offered at once, batch {on['max_num_seqs']} (prompt chunks and admissions "
                "beside the decodes in most steps):", "",
                "| async scheduling | wall s | output tok/s | prompt + output tok/s |", "|---|---|---|---|"]
        for r in (on, off):
            out.append(f"| {'on' if r['async_scheduling'] else 'off'} | {r['wall_s']:.2f} | "
                       f"{r['output_tok_s']:.0f} | {r['total_tok_s']:.0f} |")
        out.append(f"| on / off | {on['wall_s'] / off['wall_s']:.3f} | "
                   f"{on['output_tok_s'] / off['output_tok_s']:.3f} | |")
    return out


def brownout_table(decode: list[dict]) -> list[str]:
    rows = [r for r in decode if r.get("pipelined_ms") is not None and r["tau"] in (1.0, 0.0)]
    if not rows:
        return []
    out = ["| way | batch | tau 1 pipelined ms | tau 0 pipelined ms | tau 0 / tau 1 | tau 0 / roofline | "
           "tau 0 / tau 1 one at a time |", "|---|---|---|---|---|---|---|"]
    for way in sorted({r["way"] for r in rows}):
        for B in sorted({r["batch"] for r in rows if r["way"] == way}):
            t1 = next(r for r in rows if r["way"] == way and r["batch"] == B and r["tau"] == 1.0)
            t0 = next(r for r in rows if r["way"] == way and r["batch"] == B and r["tau"] == 0.0)
            out.append(f"| {way} | {B} | {t1['pipelined_ms']:.2f} | {t0['pipelined_ms']:.2f} | "
                       f"{t0['pipelined_ms'] / t1['pipelined_ms']:.3f} | "
                       f"{t0['pipelined_ratio_roofline']:.2f}x | {t0['vs_tau1']:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Async scheduling: decode steps planned before the previous one is collected")
    args = ap.parse_args()
    meta = _load(args.raw, "meta.json") or {}
    lines = [f"# {args.title}", "",
             f"Raw: `{args.raw}`; {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
             f"{meta.get('weights', '?')} ({meta.get('preset', '?')}); copy bandwidth "
             f"{meta.get('copy_bandwidth_Bps', 0) / 1e12:.2f} TB/s. Made by "
             f"`python benchmarks/async_tables.py {args.raw} --out {args.out}`. Roofline: bytes the "
             "step reads (dense weights, the expert slots it touched, the KV cache) over the measured copy "
             "bandwidth. One process, every figure from the same engine in the same call.", ""]
    decode = _load(args.raw, "decode.json")
    if decode:
        lines += ["## CUDA-graphed decode steps: one at a time vs pipelined", "",
                  "`one at a time`: `ModelRunner.execute` (launch, then collect: the GPU waits for the host "
                  "between steps). `pipelined`: each step launched before the previous one is collected, its "
                  "input tokens read from that step's samples on the device, as the engine's loop runs with "
                  "async scheduling; 20 steps, wall time over steps. `graph replay alone`: the step's CUDA graph replayed "
                  "with its inputs already staged (no LM head, sampler or host work).", ""] + decode_table(decode) + [""]
    loop = _load(args.raw, "loop.json")
    if loop:
        lines += ["## The engine's loop (`LLMEngine.step`)", "",
                  "B requests of 512 random prompt tokens generating 48 tokens each (EOS ignored). Period: the "
                  "median time between two `step()` calls that each collected a decode step of all B requests "
                  "(the scheduler, the detokeniser and the outputs included); roofline at the mean context.",
                  ""] + loop_tables(loop) + [""]
    brown = _load(args.raw, "brownout.json")
    if brown and brownout_table(brown.get("decode", [])):
        lines += ["## Brownout decode steps, pipelined (context 512, uncalibrated united experts)", "",
                  ] + brownout_table(brown["decode"]) + [""]
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
