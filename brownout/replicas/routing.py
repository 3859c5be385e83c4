"""The SLO-aware routing choice, as a pure function over the stats each replica publishes.

Every replica publishes (`ReplicaStats`, built by `replica_stats` from its engine's snapshot)
the wait its engine's latency model predicts for a new request's first token
(`Admission.predicted_wait_s`: the prompt tokens queued ahead over the measured prefill rate,
the slot wait, one step, the P90 of recent prediction errors), the tau its controller runs at,
and whether it refused requests lately. The router ranks the replicas by

    score = predicted wait + (requests routed to it since its stats) x its added wait per request

(the second term keeps a burst that arrives between two stats updates from all landing on the
replica that looked emptiest), refusing replicas last. Replicas whose score lies within one step
of the best one's (at least `tie_s`) count as tied, and the tie goes to the one running at the
highest tau: it has spent the least accuracy, so sending it work keeps the fleet's mean tau
highest (and a dimmed replica is the loaded one). Within a
tie at the same tau, a replica that served the same session before (`affinity`) goes first:
its prefix cache likely holds the conversation's prompt; then the one whose stats hold fewer
requests, then the lower score. With any candidate's stats missing or older than
`stale_s`, `rank_replicas` returns None and the router falls back to power-of-two choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence

# A replica's stats older than this many seconds no longer describe its queue: fall back to
# power-of-two choices (a few stats periods, so one slow stats call does not trip it).
DEFAULT_STALE_S = 3.0
# Predicted waits this close (seconds) are within the model's error: the tie goes to tau.
DEFAULT_TIE_S = 0.05
# Before a replica has measured anything, one request adds about one step of wait.
DEFAULT_PER_REQUEST_S = 0.05


@dataclass(frozen=True)
class ReplicaStats:
    """What one replica publishes for routing (`to_dict` / `from_dict` cross the wire)."""

    time: float  # wall-clock seconds when taken
    predicted_ttft_s: float  # predicted first-token wait of a request arriving now
    tau: float  # the lower of the controller's prefill and decode tau (1 = exact model)
    refusing: bool = False  # refused requests (429) within the recent window
    per_request_s: float = DEFAULT_PER_REQUEST_S  # wait one more queued request adds
    num_running: int = 0
    num_waiting: int = 0

    def to_dict(self) -> dict:
        return {"time": self.time, "predicted_ttft_s": self.predicted_ttft_s, "tau": self.tau,
                "refusing": self.refusing, "per_request_s": self.per_request_s,
                "num_running": self.num_running, "num_waiting": self.num_waiting}

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> Optional["ReplicaStats"]:
        """None when `d` is empty or malformed (a replica that has published nothing yet)."""
        if not d:
            return None
        try:
            stats = cls(time=float(d["time"]), predicted_ttft_s=float(d["predicted_ttft_s"]),
                        tau=float(d["tau"]), refusing=bool(d.get("refusing", False)),
                        per_request_s=float(d.get("per_request_s", DEFAULT_PER_REQUEST_S)),
                        num_running=int(d.get("num_running", 0)),
                        num_waiting=int(d.get("num_waiting", 0)))
        except (KeyError, TypeError, ValueError):
            return None
        if not all(math.isfinite(v) for v in (stats.time, stats.predicted_ttft_s, stats.tau)):
            return None
        return stats


def replica_stats(snapshot: Mapping, now: float, refusing: bool,
                  per_request_s: float = DEFAULT_PER_REQUEST_S) -> ReplicaStats:
    """A replica's routing stats from its engine snapshot (`LLMEngine.snapshot`)."""
    tau = min(float(snapshot.get("tau_prefill", 1.0)), float(snapshot.get("tau_decode", 1.0)))
    num_waiting = int(snapshot.get("num_waiting", 0))
    wait = snapshot.get("admission_predicted_wait_s")
    if wait is None:  # an engine without the latency model: a step per request ahead
        wait = per_request_s * (num_waiting + 1)
    return ReplicaStats(time=now, predicted_ttft_s=float(wait), tau=tau, refusing=refusing,
                        per_request_s=per_request_s,
                        num_running=int(snapshot.get("num_running", 0)), num_waiting=num_waiting)


def score(stats: ReplicaStats, routed_since: int) -> float:
    """Predicted first-token wait of the next request sent to this replica."""
    return stats.predicted_ttft_s + max(0, routed_since) * stats.per_request_s


def rank_replicas(candidates: Sequence[Hashable], stats: Mapping[Hashable, Optional[ReplicaStats]],
                  now: float, routed_since: Optional[Mapping[Hashable, int]] = None, *,
                  affinity: Optional[Hashable] = None, stale_s: float = DEFAULT_STALE_S,
                  tie_s: float = DEFAULT_TIE_S) -> Optional[list[Hashable]]:
    """`candidates` best first, or None when any candidate's stats are missing or stale (the
    caller falls back to power-of-two choices)."""
    if not candidates:
        return []
    routed_since = routed_since or {}
    fresh = {}
    for c in candidates:
        s = stats.get(c)
        if s is None or now - s.time > stale_s:
            return None
        fresh[c] = s
    scored = {c: score(s, routed_since.get(c, 0)) for c, s in fresh.items()}
    out: list[Hashable] = []
    for refusing in (False, True):  # a refusing replica only when all are
        group = [c for c in candidates if fresh[c].refusing == refusing]
        while group:
            leader = min(group, key=lambda c: scored[c])
            best = scored[leader]
            # within one step of the best is within the model's granularity (a prefill ends
            # only at a step boundary); and a dimmed replica's steps are shorter, so a finer
            # comparison would send more work to the replica that is already dimmed
            window = max(tie_s, fresh[leader].per_request_s)
            tied = [c for c in group if scored[c] <= best + window]
            # highest tau first; then the session's replica; then the fewer requests its stats
            # hold (the wait model counts a running request only once slots run out; the
            # requests routed since are left to the score, since the router learns of their
            # completion only after the client has its response); then score
            tied.sort(key=lambda c: (-fresh[c].tau, c != affinity,
                                     fresh[c].num_running + fresh[c].num_waiting, scored[c]))
            out.append(tied[0])
            group.remove(tied[0])
    return out
