import random

import pytest

from seesaw_ds.kv.allocator import BlockAllocator, BlockAllocatorError


def test_random_alloc_free_keeps_invariants():
    rng = random.Random(0)
    alloc = BlockAllocator(64)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(0, 9)
            if alloc.can_allocate(n):
                held.append(alloc.allocate(n))
            else:
                with pytest.raises(BlockAllocatorError):
                    alloc.allocate(n)
        alloc.check_integrity()
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == alloc.num_used
        assert alloc.num_free + alloc.num_used == 64


def test_bad_free_leaves_state_unchanged():
    alloc = BlockAllocator(8)
    a = alloc.allocate(3)
    with pytest.raises(BlockAllocatorError, match="not allocated"):
        alloc.free([a[0], 7])                 # 7 was never handed out
    with pytest.raises(BlockAllocatorError, match="twice"):
        alloc.free([a[1], a[1]])
    assert alloc.num_used == 3
    alloc.check_integrity()
    alloc.free(a)
    with pytest.raises(BlockAllocatorError, match="double free"):
        alloc.free([a[0]])
    assert alloc.num_free == 8


def test_over_allocation_is_refused_without_mutation():
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(BlockAllocatorError, match="asked for 2 blocks, 1 free"):
        alloc.allocate(2)
    assert alloc.num_free == 1
