"""Paged KV-cache bookkeeping in plain Python: which blocks each request holds.

Blocks are allocated on demand as a request's context grows and freed when it finishes,
is aborted or is preempted. No torch: the scheduler and its tests run without a model.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._tables: dict[str, list[int]] = {}

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks the request needs to hold `num_tokens` tokens of context."""
        have = len(self._tables.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens`; returns the whole table."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise MemoryError(f"need {need} KV blocks, {len(self._free)} free")
        table = self._tables.setdefault(request_id, [])
        table.extend(self._free.pop() for _ in range(need))
        return table

    def free(self, request_id: str) -> None:
        for block in reversed(self._tables.pop(request_id, [])):
            self._free.append(block)

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks
