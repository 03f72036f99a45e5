"""The tile-unit linear (kv/csrc/decode_linear.cpp) computes x . w^T + b to bf16 rounding, at every row count
and width decode uses, including widths that leave a partial panel."""
import pytest
import torch

from seesaw_ds.kv.native import linear_ops


@pytest.fixture(scope="module")
def ops():
    ops = linear_ops()
    if ops is None:
        pytest.skip("the packed linear needs the tile unit (AMX)")
    return ops


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """Each value is the exact result rounded to bf16, give or take one bf16 step (the fp32 sums' order)."""
    exact = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    step = exact.abs().clamp_min(1e-3) * 2 ** -7                      # one bf16 step at that magnitude
    assert ((got.double() - exact).abs() <= step).all()
    assert (got == exact.to(torch.bfloat16)).float().mean() > 0.97


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(960, 576), (100, 576), (16, 32), (4100, 288), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_exact_product(ops, rows, n, k, bias):
    pack, linear = ops
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    _check(linear(x, pack(w), b, n), x, w, b)


def test_keeps_leading_dims_and_reads_strided_input(ops):
    pack, linear = ops
    x = torch.randn(1, 9, 2, 576).bfloat16()[:, :, 0]                  # [1, 9, 576], row stride 1152
    w = torch.randn(192, 576).bfloat16()
    got = linear(x, pack(w), None, 192)
    assert got.shape == (1, 9, 192)
    _check(got[0], x[0], w, None)


def test_refuses_what_it_cannot_compute(ops):
    pack, linear = ops
    with pytest.raises(RuntimeError, match="multiple of 32"):
        pack(torch.zeros(16, 100, dtype=torch.bfloat16))
    packed = pack(torch.zeros(16, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="input width"):
        linear(torch.zeros(2, 32, dtype=torch.bfloat16), packed, None, 16)
    with pytest.raises(RuntimeError, match="columns"):
        linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, None, 40)
