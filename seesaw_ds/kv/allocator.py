"""Fixed-size KV block allocator: pure bookkeeping, validates before it mutates."""
from __future__ import annotations


class BlockAllocatorError(RuntimeError):
    pass


class BlockAllocator:
    """Hands out block ids in [0, num_blocks). No tensors here; the pool owns the memory."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise BlockAllocatorError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise BlockAllocatorError(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        # NOTE: validate the whole request first so a bad call leaves the allocator unchanged.
        seen = set()
        for b in blocks:
            if b not in self._used:
                raise BlockAllocatorError(f"block {b} is not allocated (double free or foreign id)")
            if b in seen:
                raise BlockAllocatorError(f"block {b} appears twice in one free() call")
            seen.add(b)
        self._used.difference_update(blocks)
        # NOTE: pushed back in reverse, so pop() hands a freed run out again in ascending order: consecutive
        # block ids keep host <-> device copies and host-store writes to one slice copy per run
        self._free.extend(reversed(blocks))

    def check_integrity(self) -> None:
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockAllocatorError("free list holds duplicates")
        if free & self._used:
            raise BlockAllocatorError(f"blocks both free and used: {sorted(free & self._used)[:8]}")
        if len(free) + len(self._used) != self.num_blocks:
            raise BlockAllocatorError(
                f"free ({len(free)}) + used ({len(self._used)}) != total ({self.num_blocks})")
        if any(not 0 <= b < self.num_blocks for b in free | self._used):
            raise BlockAllocatorError("block id out of range")
