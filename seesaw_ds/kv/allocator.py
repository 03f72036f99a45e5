"""Fixed-size KV block allocator with reference counts: pure bookkeeping, validates before it mutates.

A block is handed out with one reference. `share` adds references (the n samples of one request hold the
prompt's full blocks together); `free` drops one reference per block and returns a block to the free list
only when its last reference goes, so preempting or finishing one sample never frees its siblings' blocks.
"""
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
        self._refs: dict[int, int] = {}                                # used block -> references (>= 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Distinct blocks in use (a shared block counts once)."""
        return len(self._refs)

    def ref_count(self, block: int) -> int:
        return self._refs.get(block, 0)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise BlockAllocatorError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise BlockAllocatorError(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def _check_held(self, blocks: list[int]) -> None:
        seen = set()
        for b in blocks:
            if b not in self._refs:
                raise BlockAllocatorError(f"block {b} is not allocated (double free or foreign id)")
            if b in seen:
                raise BlockAllocatorError(f"block {b} appears twice in one call")
            seen.add(b)

    def share(self, blocks: list[int]) -> None:
        """One more reference to each (allocated) block: another sequence now reads it too."""
        self._check_held(blocks)
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block whose last reference goes is free again."""
        # NOTE: validate the whole request first so a bad call leaves the allocator unchanged.
        self._check_held(blocks)
        released = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                released.append(b)
        # NOTE: pushed back in reverse, so pop() hands a freed run out again in ascending order: consecutive
        # block ids keep host <-> device copies and host-store writes to one slice copy per run
        self._free.extend(reversed(released))

    def check_integrity(self) -> None:
        free = set(self._free)
        used = set(self._refs)
        if len(free) != len(self._free):
            raise BlockAllocatorError("free list holds duplicates")
        if free & used:
            raise BlockAllocatorError(f"blocks both free and used: {sorted(free & used)[:8]}")
        if len(free) + len(used) != self.num_blocks:
            raise BlockAllocatorError(f"free ({len(free)}) + used ({len(used)}) != total ({self.num_blocks})")
        if any(not 0 <= b < self.num_blocks for b in free | used):
            raise BlockAllocatorError("block id out of range")
        if any(r < 1 for r in self._refs.values()):
            raise BlockAllocatorError("a used block holds no reference")
