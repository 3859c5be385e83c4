"""Paged KV-cache bookkeeping in plain Python: which blocks each request holds.

Blocks are allocated on demand as a request's context grows and released when it finishes,
is aborted or is preempted. Every block has a reference count: the requests whose tables
hold it. With prefix caching on, a full block is named by a hash of its tokens chained
with its parent block's hash, so equal hashes mean equal token prefixes; a released block
keeps its hash and its KV, stays findable in the index and is evicted least recently used
first, only when a fresh block is needed. A request whose prompt starts with cached blocks
takes a reference on them instead of computing them again.

Brownout: KV computed at tau < 1 (experts left out) is not the KV of the exact model. Each
cached block records the tau it is worth: the lowest tau of the step that computed it and
of its parent (a token's KV depends on the KV of every token before it). The rule is
`servable`: a block worth tau_b serves a new request only while the engine runs at tau <=
tau_b, i.e. dimmed at least as far (the scheduler takes the last collected step's tau as
the engine's). A request admitted then computes its own prefix at that tau or lower, so a
reused block is never worse than the KV it replaces; once the controller restores tau,
dimmed blocks stop serving and exact KV is computed again (and takes over their hashes).
Blocks computed at tau = 1 always serve. Below 1, KV also depends on the rest of its step
(routing keeps the experts hottest over the whole step), so no rule could make dimmed KV
reproducible; tau ranks how far it is from exact, and that is what the rule compares.

No torch: the scheduler and its tests run without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

EXACT_TAU = 1.0  # KV computed with every expert: the exact model's


def chain_hash(parent: Optional[int], tokens: Sequence[int]) -> int:
    """The name of a full block: its tokens and its parent's name (None for the first block).
    Python's hash of a tuple of ints is 64-bit and the same in every process; a hit is also
    checked against the block's own stored tokens."""
    return hash((parent, tuple(tokens)))


def prompt_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of `token_ids`."""
    hashes, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def servable(block_tau: float, tau_now: float) -> bool:
    """Whether KV worth `block_tau` may serve a request while the engine runs at `tau_now`."""
    return block_tau >= EXACT_TAU or tau_now <= block_tau


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Free blocks, evicted from the front: blocks without KV worth keeping go to the front,
        # released cached blocks to the back (least recently used first).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash: list[Optional[int]] = [None] * num_blocks  # set while indexed
        self._tokens: list[Optional[tuple[int, ...]]] = [None] * num_blocks
        self._tau = [EXACT_TAU] * num_blocks
        self._index: dict[int, int] = {}  # hash -> block holding that prefix
        self._tables: dict[str, list[int]] = {}
        self._chains: dict[str, list[tuple[int, float]]] = {}  # (hash, tau) of computed full blocks
        self.num_cached_free = 0  # free blocks that still hold an indexed prefix

    # ---- prefix lookup -----------------------------------------------------------------
    def cached_prefix(self, token_ids: Sequence[int], tau_now: float = EXACT_TAU) -> list[int]:
        """The cached blocks that hold the longest prefix of `token_ids`, servable at
        `tau_now`. At least the last token is left out, so its logits get computed."""
        if not self.enable_caching:
            return []
        bs, parent, hit = self.block_size, None, []
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, tokens)
            block = self._index.get(parent)
            if block is None or self._tokens[block] != tokens or not servable(self._tau[block], tau_now):
                break
            hit.append(block)
        return hit

    def blocks_needed(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> int:
        """Free blocks the request takes to hold `num_tokens` tokens of context, starting
        from the `cached` blocks (when it holds none yet): a fresh block, or a cached block
        nobody holds (it leaves the free list)."""
        have = len(self._tables.get(request_id, ())) or len(cached)
        revived = sum(1 for b in cached if self._refs[b] == 0)
        return max(0, -(-num_tokens // self.block_size) - have) + revived

    def can_allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        return self.blocks_needed(request_id, num_tokens, cached) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int, cached: Sequence[int] = ()) -> list[int]:
        """Grow the request's table to cover `num_tokens`; returns the whole table. A request
        that holds no blocks yet starts from the `cached` ones (from `cached_prefix`)."""
        need = self.blocks_needed(request_id, num_tokens, cached)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        table = self._tables.setdefault(request_id, [])
        if not table and cached:
            for block in cached:
                self._take(block)
            table.extend(cached)
            self._chains[request_id] = [(self._hash[b], self._tau[b]) for b in cached]
        while len(table) * self.block_size < num_tokens:
            block = next(iter(self._free))
            self._evict(block)
            self._take(block)
            table.append(block)
        return table

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed: int,
               tau: float) -> None:
        """Index the request's full blocks whose KV the last step computed at `tau`."""
        if not self.enable_caching:
            return
        table, bs = self._tables.get(request_id, ()), self.block_size
        chain = self._chains.setdefault(request_id, [])
        for i in range(len(chain), min(num_computed // bs, len(table))):
            parent, parent_tau = chain[-1] if chain else (None, EXACT_TAU)
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            h, worth = chain_hash(parent, tokens), min(tau, parent_tau)
            chain.append((h, worth))
            old = self._index.get(h)
            if old is not None and self._tau[old] >= worth:
                continue  # as good a copy is indexed already; this one is dropped when released
            if old is not None:
                self._drop(old)
            block = table[i]
            self._index[h], self._hash[block], self._tokens[block] = block, h, tokens
            self._tau[block] = worth

    def free(self, request_id: str) -> None:
        """Release the request's blocks, last block first, so its tail is evicted first."""
        self._chains.pop(request_id, None)
        for block in reversed(self._tables.pop(request_id, [])):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)
                else:
                    self.num_cached_free += 1

    # ---- internals ---------------------------------------------------------------------
    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
            if self._hash[block] is not None:
                self.num_cached_free -= 1
        self._refs[block] += 1

    def _evict(self, block: int) -> None:
        """Forget the prefix a free block holds, before it is handed out fresh."""
        if self._hash[block] is not None:
            self._unindex(block)
            self.num_cached_free -= 1

    def _drop(self, block: int) -> None:
        """Unindex a block a better copy replaces; free, it goes first to be handed out."""
        self._unindex(block)
        if self._refs[block] == 0:
            self.num_cached_free -= 1
            self._free.move_to_end(block, last=False)

    def _unindex(self, block: int) -> None:
        del self._index[self._hash[block]]
        self._hash[block], self._tokens[block], self._tau[block] = None, None, EXACT_TAU

    # ---- reads -------------------------------------------------------------------------
    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def block_tau(self, block: int) -> float:
        return self._tau[block]

    def block_hash(self, block: int) -> Optional[int]:
        return self._hash[block]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks
