"""Plot files are produced for a run and across runs, also from sparse data."""

from brownout.bench.plots import p90_per_window, plot_comparison, plot_run, rate_per_window
from brownout.bench.report import Run
from test_bench_report import make_run


def test_run_plots(tmp_path):
    run = make_run()
    run.metrics = [dict(m, running=2, waiting=1, kv_cache_usage=0.3) for m in run.metrics]
    paths = plot_run(run, tmp_path, slo_ttft=0.55, slo_tpot=0.1)
    assert [p.name for p in paths] == ["latency.png", "tau.png", "rate.png", "queue.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_survive_empty_runs(tmp_path):
    paths = plot_run(Run([]), tmp_path / "a") + plot_comparison([Run([]), make_run()], tmp_path / "b")
    assert all(p.is_file() for p in paths)


def test_window_series():
    t, p90 = p90_per_window(make_run(), "ttft")
    assert t.tolist()[:3] == [0.0, 1.0, 2.0] and p90[0] == 0.1
    t, rate = rate_per_window([0.1, 0.2, 1.5, None], end=3.0)
    assert t.tolist() == [0.0, 1.0, 2.0] and rate.tolist() == [2.0, 1.0, 0.0]
