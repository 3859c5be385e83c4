"""Fail when the repository tracks a large file outside the folders allowed to hold one.

Git keeps every version of a tracked file forever, so a large file (a raw result archive, a
checkpoint, a plot) grows every clone for good. Large files belong to brownout/assets/
(the demo model the package ships); benchmark raw data is committed in compact form
(benchmarks/compact_raw.py). Outside a git checkout (e.g. an unpacked source archive) the
check is skipped with a message.

Run: python scripts/check_tree.py [--root DIR] [--max-mb 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# a tracked file above this many bytes fails the check
MAX_BYTES = 2 * 1024 * 1024
# path prefixes that may hold files of any size
ALLOWED_PREFIXES = ("brownout/assets/",)


def tracked_files(root: Path) -> list[str] | None:
    """Paths git tracks under `root` (relative to it), or None when it is no git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.stdout.decode().split("\0") if p]


def oversized(root: Path, paths: list[str], max_bytes: int = MAX_BYTES) -> list[tuple[str, int]]:
    """(path, bytes) of each file over `max_bytes` outside the allowed folders."""
    out = []
    for rel in paths:
        if rel.startswith(ALLOWED_PREFIXES):
            continue
        path = root / rel
        if path.is_file() and not path.is_symlink() and path.stat().st_size > max_bytes:
            out.append((rel, path.stat().st_size))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--max-mb", type=float, default=MAX_BYTES / 2**20)
    args = ap.parse_args(argv)
    paths = tracked_files(args.root)
    if paths is None:
        print(f"check_tree: {args.root} is not a git checkout; tracked-file sizes not checked")
        return 0
    big = oversized(args.root, paths, int(args.max_mb * 2**20))
    for rel, size in big:
        print(f"check_tree: {rel} is {size / 2**20:.1f} MiB, over {args.max_mb:g} MiB "
              f"(only {', '.join(ALLOWED_PREFIXES)} may hold such files)", file=sys.stderr)
    if not big:
        print(f"check_tree: {len(paths)} tracked files, none over {args.max_mb:g} MiB outside "
              f"{', '.join(ALLOWED_PREFIXES)}")
    return 1 if big else 0


if __name__ == "__main__":
    sys.exit(main())
