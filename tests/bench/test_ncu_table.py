"""benchmarks/ncu_attention.py: ncu's two CSV layouts parsed into one row a launch, and the table."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ncu_attention", ROOT / "benchmarks" / "ncu_attention.py")
ncu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu)

RAW = ('==PROF== Connected to process 1\n'
       '"ID","Kernel Name","gpu__time_duration.sum","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"\n'
       '"","","nsecond",""\n'
       '"0","_attn_kernel","74016","0.41"\n'
       '"1","_attn_kernel","73920","0.39"\n')
DETAILS = ('"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
           '"0","_attn_kernel","SOL","Duration","us","74.02"\n'
           '"0","_attn_kernel","SOL","DRAM Throughput","%","86.1"\n'
           '"1","_merge_kernel","SOL","Duration","us","2.10"\n')


def test_raw_page_gives_a_row_a_launch_without_the_units_row():
    got = ncu.parse(RAW)
    assert [g["gpu__time_duration.sum"] for g in got] == ["74016", "73920"]


def test_details_page_is_pivoted_by_launch():
    got = ncu.parse(DETAILS)
    assert got == [{"Kernel Name": "_attn_kernel", "Duration (us)": "74.02", "DRAM Throughput (%)": "86.1"},
                   {"Kernel Name": "_merge_kernel", "Duration (us)": "2.10"}]


def test_table_names_each_launch_and_labels_the_requested_metrics(tmp_path):
    (tmp_path / "b64_512.csv").write_text(RAW)
    out = tmp_path / "t.md"
    ncu.table([tmp_path / "b64_512.csv"], out)
    text = out.read_text()
    assert "| b64_512 _attn_kernel #0 | b64_512 _attn_kernel #1 |" in text
    assert "| duration (ns) | 74016 | 73920 |" in text
    assert "| stall: barrier | 0.41 | 0.39 |" in text
    assert "| DRAM throughput (% of peak) | - | - |" in text  # asked for, not in this CSV
