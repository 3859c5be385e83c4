"""The main job's simulated headline: a table within 80 columns, a conclusion that follows."""

from brownout.bench.demo import NOISE_WINDOWS, sim_conclusion, sim_table


def _rows(off, aimd, pred):
    base = dict(goodput_req_s=12.3, rejected=100, p90_ttft_s=0.09, p90_tpot_s=0.02, mean_tau=0.7)
    return [dict(base, label="off", violations=off, reduction=None, mean_tau=1.0),
            dict(base, label="aimd", violations=aimd, reduction=1 - aimd / max(off, 1)),
            dict(base, label="predictive", violations=pred, reduction=1 - pred / max(off, 1))]


def test_table_fits_80_columns_and_says_it_is_simulated():
    lines = sim_table(_rows(24, 4, 1))
    assert all(len(line) <= 80 for line in lines)
    assert any("SIMULATED" in line for line in lines)


def test_conclusion_names_the_best_policy_or_says_no_difference():
    assert "predictive had 23 fewer" in sim_conclusion(_rows(24, 4, 1))
    same = sim_conclusion(_rows(10, 10 - NOISE_WINDOWS, 11))
    assert "no difference beyond noise" in same
    assert "simulated" in same
