"""Compact raw data of a benchmark run: what the committed tables are computed from, small.

A run's raw output (its output directory, or the tarball `device_run.sh` returns) becomes a
tree with the same relative paths, committed as benchmarks/results/<experiment>/raw/<name>/:
  requests.jsonl   -> requests.jsonl.gz, each record without `token_times` (the arrival time
                      of every token: most of the bytes; the tables need only first_sent,
                      first_token, done, output_tokens and the status fields)
  other *.jsonl    -> *.jsonl.gz, unchanged (the /metrics scrapes)
  *.log            -> *.log.gz without the HTTP server's access lines (one per request)
  *.png, *.svg ... -> dropped (`brownout bench` redraws plots from the data)
  other files      -> kept; gzipped when over GZIP_ABOVE_BYTES
Input that is already compact passes through unchanged, and gzip streams carry no
timestamp, so compacting twice gives the same bytes. A run's tree should stay under
RUN_BUDGET_BYTES; a warning names the largest files when it does not.

Usage: python benchmarks/compact_raw.py SRC DEST [--part SUBDIR]
  SRC     a run directory or a .tgz; DEST the directory to write (may be SRC: in place)
  --part  the subdirectory of SRC that holds the run (`hl` for the headline part of a
          device_run.sh tarball, `sweep` for its rate sweep); the files at the top of SRC
          (the call's GPU description and logs) come along
e.g. python benchmarks/compact_raw.py h18.tgz benchmarks/results/headline/raw/headline_h200_run18 --part hl
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("compact_raw")

# files under this stay plain text, readable in a browser; larger ones are gzipped
GZIP_ABOVE_BYTES = 32 * 1024
# a compact run is meant to cost the repository about this much at most
RUN_BUDGET_BYTES = 1 << 20
# plots and binaries: redrawn or rebuilt from the data, never committed
DROPPED_SUFFIXES = frozenset({".png", ".svg", ".pdf", ".whl", ".pt", ".safetensors"})
# per-token arrival times: bulky, and no committed table reads them
DROPPED_REQUEST_FIELDS = ("token_times",)
# uvicorn's access log: `INFO:     127.0.0.1:44874 - "GET /health HTTP/1.1" 200 OK`
ACCESS_LINE = re.compile(r'^INFO:\s+\S+:\d+ - "[A-Z]+ \S+ HTTP/[\d.]+" \d+')


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file, plain or gzipped."""
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_file(run_dir: Path, stem: str) -> Optional[Path]:
    """`stem`.jsonl of a run directory, compact (.gz) or not; None when neither exists."""
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
            z.write(data)
    else:
        path.write_bytes(data)
    return path


def _requests(data: bytes) -> bytes:
    out = io.StringIO()
    for line in data.decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            for key in DROPPED_REQUEST_FIELDS:
                rec.pop(key, None)
            out.write(json.dumps(rec) + "\n")
    return out.getvalue().encode()


def _log(data: bytes) -> bytes:
    lines = data.decode(errors="replace").splitlines(keepends=True)
    return "".join(line for line in lines if not ACCESS_LINE.match(line)).encode()


def compact_file(src: Path, dest: Path) -> Optional[Path]:
    """Write the compact form of `src` at `dest` (a `.gz` is added where it is gzipped);
    returns the path written, or None when the file is dropped."""
    data = src.read_bytes()
    if src.suffix == ".gz":
        data, src, dest = gzip.decompress(data), src.with_suffix(""), dest.with_suffix("")
    if src.suffix in DROPPED_SUFFIXES:
        return None
    if src.name == "requests.jsonl":
        return _write(dest, _requests(data), gz=True)
    if src.suffix == ".jsonl":
        return _write(dest, data, gz=True)
    if src.suffix == ".log":
        return _write(dest, _log(data), gz=True)
    return _write(dest, data, gz=len(data) > GZIP_ABOVE_BYTES)


def _files(root: Path) -> Iterator[Path]:
    return iter(sorted(p for p in root.rglob("*") if p.is_file()))


def compact_tree(src: Path, dest: Path) -> int:
    """Compact every file under `src` into `dest` (which may be `src`); returns the bytes written."""
    total, written = 0, []
    for path in list(_files(src)):
        rel = path.relative_to(src)
        out = compact_file(path, dest / rel)
        if out is not None:
            total += out.stat().st_size
            written.append(out)
        if dest.resolve() == src.resolve() and out != path:
            path.unlink()  # in place: the compact file replaces the original
    if total > RUN_BUDGET_BYTES:
        largest = sorted(written, key=lambda p: -p.stat().st_size)[:5]
        log.warning("%s holds %.2f MB, over the %.1f MB budget of a run; largest: %s", dest, total / 1e6,
                    RUN_BUDGET_BYTES / 1e6, ", ".join(f"{p.relative_to(dest)} ({p.stat().st_size // 1024} KB)"
                                                     for p in largest))
    return total


def _compact_part(root: Path, dest: Path, part: Optional[str]) -> int:
    if not part:
        return compact_tree(root, dest)
    if not (root / part).is_dir():
        raise FileNotFoundError(f"{root} has no folder {part!r}")
    total = compact_tree(root / part, dest)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        out = compact_file(path, dest / path.name)
        total += out.stat().st_size if out else 0
    return total


def compact(src: Path, dest: Path, part: Optional[str] = None) -> int:
    """Compact a run directory or tarball (optionally its subdirectory `part`, with the
    files at its top) into `dest`; returns the bytes written."""
    if src.is_dir():
        return _compact_part(src, dest, part)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(src) as tar:
        if hasattr(tarfile, "data_filter"):  # refuses links and paths outside the folder
            tar.extractall(tmp, filter="data")
        else:
            tar.extractall(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        return _compact_part(Path(tmp), dest, part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="run directory or .tgz")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--part", default=None, help="subdirectory of SRC that holds the run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    total = compact(args.src, args.dest, args.part)
    log.info("%s: %.0f KB", args.dest, total / 1024)


if __name__ == "__main__":
    main()
