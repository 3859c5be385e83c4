"""benchmarks/compact_raw.py: a run's raw output in the compact form that is committed."""

import gzip
import importlib.util
import io
import json
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compact_raw.py"


def _module():
    spec = importlib.util.spec_from_file_location("compact_raw", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(root: Path) -> Path:
    (root / "off").mkdir(parents=True)
    recs = [{"index": i, "first_sent": 0.1 * i, "first_token": 0.1 * i + 0.05, "done": 0.1 * i + 0.5,
             "token_times": [0.1 * i + 0.05 + 0.01 * k for k in range(40)], "output_tokens": 40,
             "status": 200} for i in range(50)]
    (root / "off" / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "off" / "metrics.jsonl").write_text(json.dumps({"t": 0.0, "tau_decode": 1.0}) + "\n")
    (root / "off" / "latency.png").write_bytes(b"\x89PNG")
    (root / "headline.json").write_text('{"rows": []}')
    (root / "server-off.log").write_text(
        "INFO:     Started server process [819]\n"
        'INFO:     127.0.0.1:44874 - "GET /health HTTP/1.1" 200 OK\n'
        "2026-12-02 12:50:36,209 INFO brownout.control.predictive[engine]: tau 1.00\n"
        'INFO:     127.0.0.1:44878 - "POST /v1/completions HTTP/1.1" 200 OK\n')
    return root


def test_compact_form_keeps_what_the_tables_need_and_drops_the_bulk(tmp_path):
    m = _module()
    src, dest = _run_dir(tmp_path / "src"), tmp_path / "dest"
    m.compact(src, dest)
    recs = m.read_jsonl(dest / "off" / "requests.jsonl.gz")
    assert len(recs) == 50 and "token_times" not in recs[0]
    assert recs[3] == {"index": 3, "first_sent": 0.1 * 3, "first_token": 0.1 * 3 + 0.05,
                       "done": 0.1 * 3 + 0.5, "output_tokens": 40, "status": 200}
    assert m.read_jsonl(m.jsonl_file(dest / "off", "metrics")) == [{"t": 0.0, "tau_decode": 1.0}]
    assert not (dest / "off" / "latency.png").exists()
    assert (dest / "headline.json").read_text() == '{"rows": []}'  # small: stays plain
    log = gzip.decompress((dest / "server-off.log.gz").read_bytes()).decode()
    assert "HTTP/1.1" not in log and "Started server process" in log and "tau 1.00" in log


def test_compacting_twice_gives_the_same_bytes_and_works_in_place(tmp_path):
    m = _module()
    src, dest = _run_dir(tmp_path / "src"), tmp_path / "dest"
    m.compact(src, dest)
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    m.compact_tree(dest, dest)
    after = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before
    m.compact_tree(src, src)  # in place: the originals are replaced
    assert not (src / "off" / "requests.jsonl").exists() and (src / "off" / "requests.jsonl.gz").is_file()


def test_a_part_of_a_tarball_comes_with_the_files_at_its_top(tmp_path):
    m = _module()
    work = tmp_path / "work"
    _run_dir(work / "hl")
    (work / "gpu.txt").write_text("NVIDIA H200\n")
    (work / "engine").mkdir()
    (work / "engine" / "decode.json").write_text("[]")
    tgz = tmp_path / "h1.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(work, arcname=".")
    dest = tmp_path / "run"
    m.compact(tgz, dest, part="hl")
    assert (dest / "gpu.txt").read_text() == "NVIDIA H200\n"
    assert (dest / "off" / "requests.jsonl.gz").is_file() and not (dest / "engine").exists()
    # already compact input passes through unchanged
    again = tmp_path / "again"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(dest, arcname=".")
    (tmp_path / "compact.tgz").write_bytes(buf.getvalue())
    m.compact(tmp_path / "compact.tgz", again)
    files = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == files
