"""PackedLinear (models/packed_linear.py): one matmul (the project's kernel, AMX or AVX512-BF16, or oneDNN's)
over the packed concatenation of several linears' bf16 weights computes what each F.linear computes (to bf16 rounding,
mostly bit for bit), at decode's row counts; its copy follows the weights of record (in-place writes,
re-binds, the decode path's weights key); a row-parallel linear adds its bias after the all-reduce; the
runner's LM head runs packed too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesaw_ds.kv.native import linear_ops
from seesaw_ds.models.decode_path import LeanDecoder, packed_call
from seesaw_ds.models.packed_linear import PackedLinear, packable, packing_enabled
from seesaw_ds.models.runner import ModelRunner
from tests.conftest import tiny_hf_model

pytestmark = pytest.mark.skipif(not packing_enabled(), reason="this torch has no oneDNN bf16 packed linear")


def linears(sizes, k: int, bias: bool, seed: int = 0) -> list[torch.nn.Linear]:
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(k, n, bias=bias) for n in sizes]
    with torch.no_grad():
        for m in mods:
            m.weight.normal_(0, 0.05)
            if bias:
                m.bias.normal_(0, 0.5)
    return [m.to(torch.bfloat16).requires_grad_(False) for m in mods]


@pytest.fixture(params=["native", "onednn"])
def kernel(request, monkeypatch):
    """Each test runs over both kernels: the project's (AMX or AVX512-BF16, where the CPU has either) and
    oneDNN's."""
    if request.param == "native" and linear_ops() is None:
        pytest.skip("neither a tile unit (AMX) nor AVX512-BF16 here")
    if request.param == "onednn":
        monkeypatch.setenv("SEESAW_DS_NATIVE_LINEAR", "0")
    return request.param


def test_both_kernels_are_reachable(kernel):
    (mod,) = linears((64,), 576, bias=False)
    packed = PackedLinear([mod])
    packed(torch.randn(2, 576).to(torch.bfloat16))
    assert (packed._packed.dim() == 4) == (kernel == "native")        # the native kernel's [N/16, K/2, 16, 2]


@pytest.mark.parametrize("sizes,k,bias", [((576, 192, 192), 576, True), ((1536, 1536), 576, False),
                                          ((576,), 1536, False)])
def test_packed_equals_f_linear_to_bf16_rounding(kernel, sizes, k, bias):
    mods = linears(sizes, k, bias)
    packed = PackedLinear(mods)
    equal = total = 0
    for rows in (1, 5, 22, 47, 64, 96):
        x = torch.randn(1, rows, k).to(torch.bfloat16)
        outs = packed.split(packed(x))
        for m, out in zip(mods, outs):
            want = F.linear(x, m.weight, m.bias)
            assert out.shape == want.shape
            torch.testing.assert_close(out, want, rtol=1.6e-2, atol=1e-2)
            equal += int((out == want).sum())
            total += want.numel()
    assert equal / total > 0.99, f"only {equal / total:.3f} of the outputs are bit-equal to F.linear"


@pytest.mark.parametrize("k", [48, 64])           # 48: oneDNN's kernel (the native one needs multiples of 32)
def test_packed_copy_follows_the_weights(kernel, k):
    mods = linears((64, 32), k, bias=True)
    packed = PackedLinear(mods)
    x = torch.randn(3, k).to(torch.bfloat16)
    packed(x)
    with torch.no_grad():                          # an in-place write moves the version counter
        mods[1].weight.mul_(-1)
    torch.testing.assert_close(packed.split(packed(x))[1], F.linear(x, mods[1].weight, mods[1].bias))
    with torch.no_grad():                          # a bias alone, too
        mods[1].bias.add_(1)
    torch.testing.assert_close(packed.split(packed(x))[1], F.linear(x, mods[1].weight, mods[1].bias))
    mods[0].weight = torch.nn.Parameter(mods[0].weight * 3, requires_grad=False)      # a re-bind
    torch.testing.assert_close(packed.split(packed(x))[0], F.linear(x, mods[0].weight, mods[0].bias))
    stale = packed(x)
    mods[0].weight.data.mul_(2)                    # through .data: not seen until released
    assert torch.equal(packed(x), stale)
    packed.release()
    torch.testing.assert_close(packed.split(packed(x))[0], F.linear(x, mods[0].weight, mods[0].bias))


def test_row_parallel_adds_its_bias_after_the_all_reduce(kernel):
    (mod,) = linears((40,), 64, bias=True)
    twice = PackedLinear([mod], all_reduce=lambda out: out.mul_(2))       # two ranks with equal partials
    x = torch.randn(4, 64).to(torch.bfloat16)
    want = 2 * F.linear(x, mod.weight) + mod.bias
    torch.testing.assert_close(twice(x), want, rtol=1.6e-2, atol=2e-2)


def test_decode_path_repacks_when_the_weights_key_changes():
    """A write no version counter sees (another rank's, into shared memory) comes with a new master key."""
    model = tiny_hf_model("llama").to(torch.bfloat16)
    key = ["a"]
    decoder = LeanDecoder(model.model.layers, weights_key=lambda: key[0])
    empty = torch.zeros(1, 0, model.config.hidden_size, dtype=torch.bfloat16)

    def step():                                     # a decode step over no layer: only the key check
        decoder.run(empty, (None, None), range(0), None, None)
    step()
    proj = decoder._lean[0].packed["down"]
    x = torch.randn(1, 2, proj.modules[0].weight.shape[1]).to(torch.bfloat16)
    before = proj(x)
    proj.modules[0].weight.data.mul_(2)
    step()                                          # same key: the copy is kept
    assert torch.equal(proj(x), before)
    key[0] = "b"
    step()
    torch.testing.assert_close(proj(x), F.linear(x, proj.modules[0].weight))


def test_runner_head_runs_packed_and_follows_the_weights():
    """The LM head runs packed on the sampled rows, and an in-place write to its weight is seen."""
    model = tiny_hf_model("llama").to(torch.bfloat16)
    runner = ModelRunner(model)
    h = torch.randn(1, 5, model.config.hidden_size).to(torch.bfloat16)
    rows = torch.tensor([0, 2, 4])

    def want():
        return model.lm_head(model.model.norm(h[:, rows]))[0].float()
    torch.testing.assert_close(runner.head(h, rows), want(), rtol=1.6e-2, atol=1e-2)
    assert runner.lean.packed_bytes > 0
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    torch.testing.assert_close(runner.head(h, rows), want(), rtol=1.6e-2, atol=1e-2)
    runner.release_derived()
    assert runner.lean.packed_bytes == 0


def test_what_is_packed():
    assert not packable([torch.nn.Linear(4, 8)])                                            # fp32 weight
    assert not packable(linears((8,), 4, bias=True) + linears((8,), 4, bias=False))       # bias in one only
    assert not packable(linears((8,), 4, bias=False) + linears((8,), 6, bias=False))      # input widths differ
    assert packed_call(linears((8, 8), 4, bias=False)) is not None
