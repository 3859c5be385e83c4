"""The main job's simulated headline: a table within 80 columns, a conclusion that follows."""

from brownout.bench.demo import NOISE_WINDOWS, conclusion, run_table, sim_conclusion, sim_table


def _rows(off, aimd, pred):
    base = dict(goodput_req_s=12.3, rejected=100, p90_ttft_s=0.09, p90_tpot_s=0.02, mean_tau=0.7)
    return [dict(base, label="off", violations=off, reduction=None, mean_tau=1.0),
            dict(base, label="aimd", violations=aimd, reduction=1 - aimd / max(off, 1)),
            dict(base, label="predictive", violations=pred, reduction=1 - pred / max(off, 1))]


def test_table_fits_80_columns_and_says_it_is_simulated():
    rows = _rows(24, 4, 1) + [dict(_rows(24, 4, 1)[2], label="ladder", accuracy_spent=0.395)]
    lines = sim_table(rows)
    assert all(len(line) <= 80 for line in lines)
    assert any("SIMULATED" in line for line in lines)
    assert lines[4].endswith("+40%") and lines[1].endswith("-")  # ladder spent 39.5%; off: none
    assert lines[0].index("acc.") == lines[4].index("+40%")


def test_conclusion_names_the_best_policy_or_says_no_difference():
    assert "predictive had 23 fewer" in sim_conclusion(_rows(24, 4, 1))
    same = sim_conclusion(_rows(10, 10 - NOISE_WINDOWS, 11))
    assert "no difference beyond noise" in same
    assert "simulated" in same


def test_real_run_table_fits_80_columns_with_and_without_accuracy():
    rows = _rows(25, 12, 9)
    for r, ppl in zip(rows, (50.0, 52.5, 55.0)):
        r["perplexity"] = ppl
    with_ppl = run_table(rows, price_at_tau1=50.0)
    assert all(len(line) <= 80 for line in with_ppl)
    assert with_ppl[0].endswith("ppl") and with_ppl[2].endswith("+5%") and with_ppl[3].endswith("+10%")
    without = run_table(rows, price_at_tau1=None)
    assert "ppl" not in without[0] and all(len(line) <= 80 for line in without)


def test_a_gap_without_dimming_is_called_noise():
    rows = _rows(25, 20, 12)
    rows[2]["mean_tau"] = 1.0  # predictive never dimmed: its 13 fewer windows are not brownout's
    rows[1]["mean_tau"] = 1.0
    text = conclusion(rows, simulated=False)
    assert "noise" in text and "barely dimmed" in text
    rows[2]["mean_tau"] = 0.6
    assert "predictive had 13 fewer" in conclusion(rows, simulated=False)


def test_accuracy_column_only_from_an_in_domain_quoted_price(tmp_path, monkeypatch):
    import json

    import brownout.bench.demo as demo
    (tmp_path / "demo").mkdir()
    table = tmp_path / "demo" / "perplexity-way4.json"
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    assert demo._eval_table() is None
    table.write_text(json.dumps({"text": "../shared/data/eval/wikitext2_raw_valid.txt",
                                 "results": [{"tau": 1.0, "perplexity": 800.0}]}))
    assert demo._eval_table() is None  # out-of-domain text: no column
    table.write_text(json.dumps({"quoted": "held_out_estimate", "tau": [0.0, 1.0],
                                 "perplexity": [60.0, 50.0], "increase": [0.2, 0.0]}))
    assert demo._eval_table() == table
