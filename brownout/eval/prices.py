"""Accuracy prices of a united-expert set: perplexity increase per tau, by kind of text.

A text is `in_distribution` when its file is one of the calibration sources of the united
set (same sha256, whatever part of it is priced) and `held_out` otherwise: a source the
calibration never saw, the price an operator should read. Per kind and tau the price is
the mean over its texts of perplexity(tau) / perplexity(1) - 1 (each text counts once);
the kind's perplexity is the geometric mean over its texts. Prices are stored in the
united set's manifest under "prices".

A set fitted on every source at hand can also carry a `held_out_estimate`: the same
recipe fitted on all sources but one and priced on the one left out, once per source
(leave-one-source-out), written by whoever ran those fits. Where present it is the quoted
price: it prices text the model knows well but the calibration never saw, where a measured
held-out text the model knows poorly understates what brownout costs.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

from brownout.unite.sources import file_sha256
from brownout.unite.store import MANIFEST_FILE

log = logging.getLogger(__name__)

KINDS = ("held_out", "in_distribution")  # measured kinds; the first present is quoted
QUOTE_ORDER = ("held_out_estimate",) + KINDS  # the quoted price: the first entry present


def calibration_digests(manifest: Optional[dict]) -> set[str]:
    """sha256 of every calibration source of a united set (empty: calibration-free)."""
    cal = (manifest or {}).get("calibration") or {}
    return {s["sha256"] for s in cal.get("sources", cal.get("files", [])) if "sha256" in s}


def text_kind(path: Path, manifest: Optional[dict]) -> str:
    return "in_distribution" if file_sha256(Path(path)) in calibration_digests(manifest) else "held_out"


def summarise(texts: Sequence[dict]) -> list[dict]:
    """Per tau over texts [{"results": [{"tau", "nll", "perplexity", ...}]}] of one kind."""
    out = []
    for i, first in enumerate(texts[0]["results"]):
        rows = [t["results"][i] for t in texts]
        entry = {"tau": first["tau"], "top_k": first.get("top_k"),
                 "nll": sum(r["nll"] for r in rows) / len(rows),
                 "perplexity": math.exp(sum(r["nll"] for r in rows) / len(rows)),
                 "tokens_scored": sum(r["tokens_scored"] for r in rows)}
        # the price of tau at this row's k' (each k' row is priced against tau 1 at the same k')
        base = [next((b for b in t["results"] if b["tau"] == 1.0
                      and b.get("top_k") == first.get("top_k")), None) for t in texts]
        if all(b is not None for b in base):
            entry["increase"] = sum(r["perplexity"] / b["perplexity"] - 1 for r, b in zip(rows, base)) / len(rows)
        touched = [r["mean_slots_touched"] for r in rows if r.get("mean_slots_touched")]
        if touched:
            entry["mean_slots_touched"] = [sum(c) / len(touched) for c in zip(*touched)]
        out.append(entry)
    return out


def by_kind(texts: Sequence[dict]) -> dict[str, list[dict]]:
    """{kind: per-tau summary} over texts that carry a "kind"."""
    return {kind: summarise([t for t in texts if t["kind"] == kind])
            for kind in KINDS if any(t["kind"] == kind for t in texts)}


def quoted_kind(kinds: dict) -> str:
    return next(k for k in KINDS if k in kinds)


def manifest_prices(texts: Sequence[dict], window: int, batch_tokens: int) -> dict:
    """The "prices" entry of a manifest: texts priced and, per kind, perplexity and increase per tau."""
    kinds = by_kind(texts)
    entry = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "window": window, "batch_tokens": batch_tokens,
             "texts": [{k: t[k] for k in ("path", "name", "sha256", "part", "kind", "tokens")} for t in texts]}
    for kind, rows in kinds.items():
        entry[kind] = {"tau": [r["tau"] for r in rows], "perplexity": [r["perplexity"] for r in rows],
                       "increase": [r.get("increase") for r in rows]}
    return entry


def record_prices(united_dir: Path, entries: dict) -> dict:
    """Merge `entries` into the manifest's "prices" (measured kinds replace all measured
    ones, an estimate is kept unless replaced) and name the quoted entry; returns the prices."""
    path = Path(united_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    prices = dict(manifest.get("prices") or {})
    if any(k in entries for k in KINDS):
        for k in KINDS + ("texts",):
            prices.pop(k, None)
    prices.update(entries)
    prices["quoted"] = next(k for k in QUOTE_ORDER if k in prices)
    manifest["prices"] = prices
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("recorded prices (%s) in %s; quoted: %s", ", ".join(entries), path, prices["quoted"])
    return prices


def quoted_table(manifest: dict) -> dict:
    """The quoted price of a manifest as an eval table {"tau", "perplexity", "increase"}
    (the form `brownout.bench.report.load_eval_table` reads)."""
    prices = manifest.get("prices") or {}
    if "quoted" not in prices:
        raise ValueError("united experts: the manifest holds no prices (brownout eval perplexity --record)")
    entry = prices[prices["quoted"]]
    return {"quoted": prices["quoted"], "tau": entry["tau"], "perplexity": entry["perplexity"],
            "increase": entry["increase"]}
