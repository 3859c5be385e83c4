"""The simulator against a committed GPU run: headline run 15 on the H200, brownout off
(conversation trace, 2x burst, TTFT admission), replayed from the committed H200 profile.
Its violation windows, goodput and refusals land within the validation target (20%, or 2
windows) of the measurement. Needs the trace in ../shared/data."""

import importlib.util
import sys
from pathlib import Path

from brownout.sim.profile import load_profile
from brownout.sim.run import sim_requests, simulate

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RUN = 15
TRACE = "traces/azure_llm_2023_conv.csv"


def _sibling(name):
    if str(BENCHMARKS) not in sys.path:  # the scripts import each other
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_simulated_off_run_matches_the_h200_measurement(shared_data, tmp_path):
    headline = _sibling("sim_headline")
    validate = _sibling("sim_validate")
    workload, setup = headline.headline_setup("h200", RUN, "off", load_profile("h200"),
                                              shared_data / TRACE)
    report = simulate(workload, tmp_path, setup, plots=False, requests=sim_requests(workload))
    measured = headline.measured_rows("h200", RUN)["off"]
    for name, (key, get, slack) in validate.FIGURES.items():
        assert validate.within(get(report), measured[key], slack), (name, get(report), measured[key])
