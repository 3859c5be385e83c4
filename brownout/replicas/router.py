"""`SLORouter`: Ray Serve's request router for brownout replicas.

It reads the stats each replica publishes (`RunningReplica.routing_stats`, refreshed every
`request_routing_stats_period_s`) and ranks the replicas with `rank_replicas`: lowest
predicted time to first token first, ties to the highest tau, refusing replicas last, the
session's previous replica first within a tie (`x-session-id` header: prefix-cache
affinity). When any replica's stats are missing or stale it falls back to Ray's
power-of-two choices. Ray tries the ranks in order and skips a replica at its
`max_ongoing_requests`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Optional

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from brownout.replicas.routing import DEFAULT_STALE_S, DEFAULT_TIE_S, ReplicaStats, rank_replicas

logger = logging.getLogger(__name__)

# Sessions whose last replica the router remembers (least recently used forgotten first).
MAX_SESSIONS = 4096


class SLORouter(PowerOfTwoChoicesRequestRouter):
    """Routes each request to the replica with the lowest predicted TTFT (see module doc)."""

    def initialize_state(self, stale_s: float = DEFAULT_STALE_S, tie_s: float = DEFAULT_TIE_S,
                         **kwargs) -> None:
        if not stale_s > 0:
            raise ValueError(f"stale_s: {stale_s} must be > 0")
        if not tie_s >= 0:
            raise ValueError(f"tie_s: {tie_s} must be >= 0")
        self.stale_s, self.tie_s = stale_s, tie_s
        # replica -> (time of the stats it last published, ids of the requests routed to it
        # since that are still running: a finished one no longer adds to its wait)
        self._routed: dict[ReplicaID, tuple[float, set[str]]] = {}
        self._sessions: OrderedDict[str, ReplicaID] = OrderedDict()
        self.num_slo_choices = 0
        self.num_fallback_choices = 0

    def _routed_since(self, replica_id: ReplicaID, stats: ReplicaStats) -> set[str]:
        seen, ids = self._routed.get(replica_id, (stats.time, set()))
        return ids if seen == stats.time else set()  # fresh stats already count them

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        stats = {rid: ReplicaStats.from_dict(r.routing_stats) for rid, r in by_id.items()}
        routed = {rid: len(self._routed_since(rid, s)) for rid, s in stats.items() if s is not None}
        session = pending_request.metadata.session_id if pending_request is not None else ""
        ranked = rank_replicas(list(by_id), stats, time.time(), routed,
                               affinity=self._sessions.get(session) if session else None,
                               stale_s=self.stale_s, tie_s=self.tie_s)
        if ranked is None:
            self.num_fallback_choices += 1
            return await super().choose_replicas(candidate_replicas, pending_request)
        self.num_slo_choices += 1
        return [[by_id[rid]] for rid in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result) -> None:
        replica = self._replicas.get(replica_id)
        stats = ReplicaStats.from_dict(replica.routing_stats) if replica is not None else None
        if stats is not None and pending_request is not None:
            ids = self._routed_since(replica_id, stats)
            ids.add(pending_request.metadata.internal_request_id)
            self._routed[replica_id] = (stats.time, ids)
        session = pending_request.metadata.session_id if pending_request is not None else ""
        if session:
            self._sessions[session] = replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._routed.get(replica_id)
        if routed is not None:
            routed[1].discard(internal_request_id)
