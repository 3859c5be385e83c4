"""Report metrics on hand-made request logs: percentiles, goodput, violation windows, tau."""

import json

import numpy as np
import pytest

from brownout.bench.report import (Run, accuracy_at, compare_runs, compute_report,
                                   load_eval_table, time_weighted_mean, violation_windows,
                                   write_report)


def rec(i, sent, ttft, n=11, itl=0.05, status=200, error=None):
    first = sent + ttft
    times = [first + k * itl for k in range(n)]
    return {"index": i, "scheduled": sent, "first_sent": sent, "sent": sent, "first_token": first,
            "token_times": times, "done": times[-1], "status": status, "error": error,
            "rejected": False, "retry_after": None, "output_tokens": n, "prompt_tokens": 4}


def failed(i, sent, status, rejected=False):
    return {"index": i, "scheduled": sent, "first_sent": sent, "sent": sent, "first_token": None,
            "token_times": [], "done": sent + 0.01, "status": status, "error": "x",
            "rejected": rejected, "output_tokens": 0}


def make_run():
    # request i is sent at t=i with TTFT (i+1)/10; request 2 decodes slowly (TPOT 0.3)
    reqs = [rec(i, float(i), (i + 1) / 10, itl=0.3 if i == 2 else 0.05) for i in range(10)]
    reqs += [failed(10, 3.0, 429, rejected=True), failed(11, 4.0, 500), failed(12, 5.0, None)]
    metrics = [{"t": 0.0, "tau_decode": 1.0, "tau_prefill": 1.0},
               {"t": 4.0, "tau_decode": 0.5, "tau_prefill": 1.0},
               {"t": 8.0, "tau_decode": 1.0, "tau_prefill": 1.0}]
    return Run(reqs, metrics, {"label": "predictive"})


def test_latency_percentiles_goodput_and_errors():
    r = compute_report(make_run(), slo_ttft=0.55, slo_tpot=0.1)
    ttft = np.arange(1, 11) / 10
    assert r["latency"]["ttft"]["p50"] == pytest.approx(np.percentile(ttft, 50))
    assert r["latency"]["ttft"]["p90"] == pytest.approx(np.percentile(ttft, 90))
    assert r["latency"]["ttft"]["p99"] == pytest.approx(np.percentile(ttft, 99))
    tpot = [0.05] * 9 + [0.3]
    assert r["latency"]["tpot"]["p90"] == pytest.approx(np.percentile(tpot, 90))
    assert r["latency"]["itl"]["p50"] == pytest.approx(0.05) and r["latency"]["itl"]["n"] == 100
    assert r["latency"]["e2e"]["mean"] == pytest.approx(np.mean(ttft + np.array(tpot) * 10))
    # the run spans from t=0 to request 9's last token at 9 + 1.0 + 0.5
    assert r["duration_s"] == pytest.approx(10.5)
    assert r["throughput_tok_s"] == pytest.approx(110 / 10.5)
    # good: TTFT <= 0.55 (requests 0-4) and TPOT <= 0.1 (not request 2)
    assert r["goodput_req_s"] == pytest.approx(4 / 10.5)
    assert r["goodput_fraction"] == pytest.approx(4 / 13)
    assert (r["num_ok"], r["num_rejected"], r["num_failed"]) == (10, 1, 3)
    # missed: the 3 failed (one refused) and the 6 served past an SLO (requests 2, 5-9)
    assert r["num_missed"] == 9
    assert r["errors"] == {"429": 1, "500": 1, "connection": 1}


def test_violation_windows_and_reduction():
    base = {"label": "off", "violations": {"ttft": {"count": 10}, "tpot": {"count": 0},
                                           "any": {"count": 10}}}
    r = compute_report(make_run(), slo_ttft=0.55, slo_tpot=0.1, baseline=base)
    v = r["violations"]
    # request i's first token comes at i + (i + 1) / 10: request 9's at 10.0, window 10
    assert v["ttft"]["windows"] == [5, 6, 7, 8, 10] and v["ttft"]["total"] == 11
    assert v["ttft"]["fraction"] == pytest.approx(5 / 11)
    assert v["tpot"]["windows"] == [5]  # request 2 finishes at 2 + 0.3 + 10 * 0.3 = 5.3
    assert v["any"]["count"] == 5
    assert r["reduction_vs_baseline"] == {"ttft": 0.5, "tpot": None, "any": 0.5}
    assert r["baseline"] == "off"


def test_violation_windows_use_p90_not_max():
    # 19 fast and 1 slow sample in one window: P90 stays under the SLO
    vals = [0.1] * 19 + [5.0]
    out = violation_windows([0.5] * 20, vals, slo=1.0, start=0.0, end=3.0)
    assert out["count"] == 0 and out["total"] == 3 and out["with_samples"] == 1
    vals = [0.1] * 17 + [5.0] * 3
    assert violation_windows([0.5] * 20, vals, 1.0, 0.0, 3.0)["windows"] == [0]


def test_time_weighted_tau():
    r = compute_report(make_run(), slo_ttft=0.55, slo_tpot=0.1)
    assert r["tau"]["decode"] == pytest.approx((4 * 1 + 4 * 0.5 + 2.5 * 1) / 10.5)
    assert r["tau"]["prefill"] == 1.0
    assert r["tau"]["mean"] == pytest.approx((r["tau"]["decode"] + 1) / 2)
    assert time_weighted_mean([5.0], [0.3], 0.0, 10.0) == 0.3
    assert time_weighted_mean([], [], 0.0, 1.0) is None
    assert compute_report(Run(make_run().requests), 1.0, 1.0)["tau"]["mean"] is None


def test_empty_run_does_not_crash():
    r = compute_report(Run([]), 1.0, 0.1)
    assert r["num_requests"] == 0 and r["goodput_req_s"] is None and r["latency"]["ttft"]["n"] == 0


def test_eval_table_formats(tmp_path):
    for i, data in enumerate(({"1.0": 10.0, "0.5": 14.0},
                              {"tau": [0.5, 1.0], "perplexity": [14.0, 10.0]},
                              [{"tau": 1.0, "perplexity": 10.0}, {"tau": 0.5, "perplexity": 14.0}],
                              {"results": [{"tau": 1.0, "ppl": 10.0}, {"tau": 0.5, "ppl": 14.0}]})):
        path = tmp_path / f"e{i}.json"
        path.write_text(json.dumps(data))
        table = load_eval_table(path)
        assert table == [(0.5, 14.0), (1.0, 10.0)]
        assert accuracy_at(table, 0.75) == pytest.approx(12.0)
        assert accuracy_at(table, 0.2) == 14.0 and accuracy_at(table, None) is None


def write_run(path, run):
    path.mkdir()
    (path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.requests))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in run.metrics))
    (path / "meta.json").write_text(json.dumps(run.meta))


def test_compare_runs(tmp_path):
    fast = make_run()
    slow = Run([rec(i, float(i), 0.9, itl=0.2) for i in range(10)],
               [{"t": 0.0, "tau_decode": 1.0, "tau_prefill": 1.0}],
               {"label": "off", "slo": {"ttft_s": 0.55, "tpot_s": 0.1}})
    write_run(tmp_path / "off", slow)
    write_run(tmp_path / "pred", fast)
    table = tmp_path / "ppl.json"
    table.write_text(json.dumps({"1.0": 10.0, "0.0": 20.0}))
    out = compare_runs([tmp_path / "pred", tmp_path / "off"], tmp_path / "cmp", eval_table=table)
    assert out["baseline"] == "off" and out["slo"]["slo_ttft"] == 0.55
    rows = {r["label"]: r for r in out["rows"]}
    # off: TTFT late in windows 0-9 (first tokens at i + 0.9), TPOT in 2-11 (done at i + 2.9)
    assert rows["off"]["violations"] == 12 and rows["off"]["reduction"] is None
    assert rows["predictive"]["violations"] == 5
    assert rows["predictive"]["reduction"] == pytest.approx(1 - 5 / 12)
    assert rows["off"]["perplexity"] == pytest.approx(10.0)
    assert rows["off"]["missed"] == 10 and rows["predictive"]["missed"] == 9
    assert rows["off"]["accuracy_spent"] is None  # no server exported it
    tau = rows["predictive"]["mean_tau"]
    assert rows["predictive"]["perplexity"] == pytest.approx(10 + 10 * (1 - tau))
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| predictive | 5 |" in md and "ppl @ mean tau" in md
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][0]["label"] == "predictive"
    for name in ("compare_latency.png", "compare_tau_served.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000


def test_write_report(tmp_path):
    r = compute_report(make_run(), slo_ttft=0.55, slo_tpot=0.1)
    write_report(r, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["violations"]["any"]["count"] == 5
    md = (tmp_path / "report.md").read_text()
    assert "| ttft | 10 |" in md and "429: 1" in md
