"""One `/metrics` page from the pages of many replicas.

`merge_pages` parses each replica's Prometheus text and renders either every sample with a
`replica` label added (per replica), or the fleet's view (aggregated): counters and histogram
samples summed, the request-count gauges summed, every other gauge (tau, KV use, margins: a
level of one engine) averaged over the replicas.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"
# Gauges that count requests: the fleet holds their sum, not their mean.
SUMMED_GAUGES = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting"})


class _Static:
    """A collector that yields the families it was given."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self):
        return iter(self._families)


def merge_pages(pages: Mapping[str, str], per_replica: bool) -> bytes:
    """Prometheus text of `pages` (replica name -> its /metrics text)."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for replica, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                if per_replica:
                    out.add_sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value)
                elif not s.name.endswith("_created"):  # a creation time sums to nonsense
                    sums[family.name][(s.name, tuple(sorted(s.labels.items())))].append(s.value)
    if not per_replica:
        for name, samples in sums.items():
            family = merged[name]
            mean = family.type == "gauge" and name not in SUMMED_GAUGES
            for (sample_name, labels), values in samples.items():
                value = sum(values) / len(values) if mean else sum(values)
                family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(merged.values()))
    return generate_latest(registry)
