"""The CPU KV pool asks for transparent huge pages before its pages are first touched."""
from pathlib import Path

import pytest
import torch

from seesaw_ds.kv.pool import HUGE_PAGE, KVPool, KVPoolSpec, advise_huge_pages, zeros

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of transparent huge pages ("always", "madvise", "never"), None off Linux."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="no transparent huge pages on this machine")
def test_pool_memory_is_advised_for_huge_pages():
    spec = KVPoolSpec(range(2), range(3), num_blocks=512, block_size=16, head_dim=64, dtype=torch.bfloat16)
    pool = KVPool(spec)                                              # 2 x 2 x 512 x 16 x 3 x 64 bf16 = 12 MiB
    t = pool.tensor
    assert t.shape == spec.shape and t.dtype == torch.bfloat16 and not t.any()
    first_huge_page = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    assert "hg" in vm_flags(first_huge_page)                        # MADV_HUGEPAGE on the mapping
    k, v = pool.layer(1)
    k[3, 5] = 1.0
    assert pool.tensor[0, 1, 3, 5].eq(1).all() and int(pool.tensor.ne(0).sum()) == 3 * 64


def test_small_tensors_are_left_alone():
    assert not advise_huge_pages(torch.empty(1000))                  # no whole 2 MiB page inside
    t = zeros((4, 5), torch.float32)
    assert t.shape == (4, 5) and not t.any()
