"""The scheduler's waiting queue: FCFS (a deque) or priority (a heap), from one factory.

Both hand out requests in the order of their `key` (FCFS: arrival time, then the order
they were added; priority: the priority first) without sorting on every step, and take a
request out from anywhere (abort, queue timeout) by marking its entry dead: dead entries
are dropped when they reach the front, or all at once when they outnumber the live ones.
"""

from __future__ import annotations

import abc
import bisect
import heapq
from collections import deque
from operator import itemgetter
from typing import Iterable, Iterator

from brownout.engine.request import Request

# Dead entries are swept out in one pass only beyond this many (and beyond the live ones):
# a short queue of aborts costs nothing to keep until it reaches the front.
_MIN_DEAD_TO_COMPACT = 64

_key_of = itemgetter(0)


class RequestQueue(abc.ABC):
    """Waiting requests in `key` order; an entry is `[key, request]`, `[key, None]` once dead."""

    def __init__(self) -> None:
        self._live: dict[Request, list] = {}  # request -> its entry (requests hash by identity)
        self._num_dead = 0

    @staticmethod
    @abc.abstractmethod
    def key(req: Request) -> tuple:
        """The order requests leave the queue in (smallest first); unique per request."""

    def push(self, req: Request) -> None:
        entry = [self.key(req), req]
        self._live[req] = entry
        self._insert(entry)

    def peek(self) -> Request:
        """The first request in `key` order (IndexError when the queue is empty)."""
        while self._front()[1] is None:
            self._pop_front()
            self._num_dead -= 1
        return self._front()[1]

    def pop(self) -> Request:
        req = self.peek()
        self._pop_front()
        del self._live[req]
        return req

    def remove(self, req: Request) -> None:
        self._live.pop(req)[1] = None
        self._num_dead += 1
        if self._num_dead > max(_MIN_DEAD_TO_COMPACT, len(self._live)):
            self._compact()
            self._num_dead = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, req: object) -> bool:
        return req in self._live

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in the order they were pushed (not `key` order)."""
        return iter(list(self._live))

    def in_order(self) -> Iterator[Request]:
        """The waiting requests in `key` order (the order they leave the queue)."""
        return (e[1] for e in self._ordered_entries() if e[1] is not None)

    @abc.abstractmethod
    def _ordered_entries(self) -> Iterable[list]:
        """Every entry, dead ones too, in key order."""

    @abc.abstractmethod
    def _insert(self, entry: list) -> None: ...

    @abc.abstractmethod
    def _front(self) -> list: ...

    @abc.abstractmethod
    def _pop_front(self) -> None: ...

    @abc.abstractmethod
    def _compact(self) -> None:
        """Drop every dead entry."""


class FCFSQueue(RequestQueue):
    """A deque kept in key order: new requests go to the back and preempted ones (which
    arrived earlier) to the front in O(1); a request stamped out of order is inserted."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: deque[list] = deque()

    @staticmethod
    def key(req: Request) -> tuple:
        return (req.arrival_time, req.seq)

    def _insert(self, entry: list) -> None:
        q = self._entries
        if not q or entry[0] > q[-1][0]:
            q.append(entry)
        elif entry[0] < q[0][0]:
            q.appendleft(entry)
        else:
            bisect.insort(q, entry, key=_key_of)

    def _ordered_entries(self) -> Iterable[list]:
        return list(self._entries)  # already in key order

    def _front(self) -> list:
        return self._entries[0]

    def _pop_front(self) -> None:
        self._entries.popleft()

    def _compact(self) -> None:
        self._entries = deque(e for e in self._entries if e[1] is not None)


class PriorityQueue(RequestQueue):
    """A heap on (priority, arrival time, order added): lower priority values go first."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: list[list] = []

    @staticmethod
    def key(req: Request) -> tuple:
        return (req.priority, req.arrival_time, req.seq)

    def _insert(self, entry: list) -> None:
        heapq.heappush(self._entries, entry)

    def _ordered_entries(self) -> Iterable[list]:
        return sorted(self._entries, key=_key_of)  # a heap is ordered only at its front

    def _front(self) -> list:
        return self._entries[0]

    def _pop_front(self) -> None:
        heapq.heappop(self._entries)

    def _compact(self) -> None:
        self._entries = [e for e in self._entries if e[1] is not None]
        heapq.heapify(self._entries)


_QUEUES = {"fcfs": FCFSQueue, "priority": PriorityQueue}


def make_request_queue(policy: str) -> RequestQueue:
    """The waiting queue of a scheduling policy ("fcfs" or "priority")."""
    return _QUEUES[policy]()
