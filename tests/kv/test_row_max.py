"""The native greedy pick (csrc/row_max.cpp) against torch's `max(dim=-1)`: values and first indices."""
import pytest
import torch

from seesaw_ds.engine.sampler import greedy_tokens
from seesaw_ds.kv import native


@pytest.fixture(scope="module", autouse=True)
def built():
    if native._module() is None:
        pytest.skip("the native kernels cannot be built on this machine")


def assert_like_torch(x: torch.Tensor) -> None:
    values, ids = native.row_max(x)
    ref = x.max(dim=-1)
    assert torch.equal(ids, ref.indices)
    assert torch.equal(values, ref.values)


@pytest.mark.parametrize("rows,cols", [(47, 49152), (5, 24576), (3, 17), (1, 1), (8, 49153)])
def test_random_rows_and_ties_give_the_first_maximum(rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen)
    top = x[0].max() + 1
    x[0, cols // 2:] = top                      # a tie over the second half: the first of them wins
    x[-1, :] = 0.25                             # a whole row tied
    assert_like_torch(x)
    assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))


def test_nan_and_infinities_follow_torch():
    x = torch.randn(4, 100)
    x[0, 50], x[0, 70] = float("nan"), float("nan")     # NaN wins, the first of them
    x[1] = float("-inf")
    x[2, 10:20] = float("inf")
    x[3, 99] = float("nan")                             # in the scalar tail
    values, ids = native.row_max(x)
    ref = x.max(dim=-1)
    assert ids.tolist() == ref.indices.tolist() == [50, 0, 10, 99]
    assert values[0].isnan() and values[1] == float("-inf") and values[2] == float("inf")


def test_non_contiguous_and_other_dtypes():
    x = torch.randn(6, 300)[:, ::3]
    assert_like_torch(x)
    half = torch.randn(3, 40).to(torch.bfloat16)       # not the native op's dtype: torch's max
    values, ids = native.row_max(half)
    assert torch.equal(ids, half.max(dim=-1).indices) and values.dtype == torch.bfloat16
