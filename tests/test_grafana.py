"""The Grafana dashboard (docs/grafana/brownout.json) charts only metrics the server exports.

Every PromQL query of every panel and template variable is parsed for the series it
selects; each must be a sample name of the server's registry (brownout.api.metrics), so a
renamed metric fails here rather than as an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from brownout.api.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "brownout.json"
# PromQL words that are not series: functions are followed by "(", these are not always
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "le"}
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


# the series each metric type renders, by suffix (a labelled family renders them once its
# first child exists, which for some needs traffic)
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name the server's registry renders (histogram series, counter totals)."""
    registry = ServerMetrics("m").registry
    return {family.name + suffix for family in registry.collect()
            for suffix in SUFFIXES[family.type]}


def queried_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (label matchers, grouping clauses,
    ranges, strings, numbers, functions and Grafana variables left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for m in NAME.finditer(expr):
        if expr[m.end():].lstrip().startswith("("):
            continue  # a function
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # inside a number such as 1e3
        if m.group() not in KEYWORDS:
            names.add(m.group())
    return names


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query)
    return exprs


def test_every_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    exprs = queries(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        expr = re.sub(r"label_values\(([^,)]+).*\)", r"\1", expr)  # a variable's query
        names = queried_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} names {sorted(names - exported)}, not exported"


def test_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]
    for panel in dashboard["panels"]:
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("expr, names", [
    ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{m=~"$model"}[$__rate_interval])))', {"a_bucket"}),
    ("sum by (kind) (rate(b_total[5m])) / 1e3 + c", {"b_total", "c"}),
    ('label_values(d, model_name)', {"d", "model_name"}),
])
def test_query_parser(expr, names):
    assert queried_names(expr) == names
