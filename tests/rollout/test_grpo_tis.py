"""Truncated importance sampling and the rollout/trainer mismatch metrics against hand computations: the
weights are 1 where the trainer's and the rollout's logprobs agree (the loss then equals plain GRPO with the
trainer as the old policy), they are capped, no gradient flows through them, and the metrics read
the per-token gaps over completion tokens only; the recipe accepts a cap and refuses a bad one."""
import math

import pytest
import torch

from seesaw_ds.rollout.grpo import build_batch, grpo_loss, mismatch_metrics, tis_weights
from seesaw_ds.rollout.recipe import RecipeError, load_grpo_recipe


def _batch(rollout_lp):
    # row 0: prompt 3 + completion 2 (targets at t = 2, 3); row 1: prompt 1 + completion 3 (t = 0, 1, 2)
    return build_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], rollout_lp, [2.0, -1.0], pad_id=0)


def test_weights_are_one_when_the_logprobs_match_and_the_loss_is_plain_grpo():
    batch = _batch([[-1.0, -2.0], [-0.5, -0.7, -0.3]])
    old = batch.old_logprobs.clone()
    assert torch.equal(tis_weights(old, batch.old_logprobs, cap=2.0), torch.ones_like(old))
    new = (old + torch.tensor([[0, 0, 0.5, 0.0], [0.0, -0.1, 0.0, 0]])).requires_grad_()
    with_tis, m = grpo_loss(new, batch, None, clip=0.2, kl_coef=0.0, old=old, tis_cap=2.0)
    plain, _ = grpo_loss(new, batch, None, clip=0.2, kl_coef=0.0)
    assert with_tis.item() == pytest.approx(plain.item(), rel=1e-6)
    assert m["tis/weight_mean"] == pytest.approx(1.0) and m["tis/capped_frac"] == 0.0


def test_weights_are_capped_and_carry_no_gradient():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, -0.1]])
    old = torch.tensor([[-1.2, -1.0, -3.0, -0.1]], requires_grad=True)   # gaps -0.2, +1.0 (> ln 2), 0, 0
    w = tis_weights(old, rollout, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(-0.2), 2.0, 1.0, 1.0]]))
    assert not w.requires_grad


def test_the_loss_is_the_weighted_surrogate_with_the_trainer_as_old_policy():
    batch = _batch([[-1.0, -2.0], [-0.5, -0.5, -0.5]])
    shift = torch.tensor([[0, 0, 0.3, -0.4], [1.0, 0.0, 0.0, 0]])       # trainer - rollout per token
    old = batch.old_logprobs + shift * batch.target_mask
    new = (old + torch.tensor([[0, 0, 0.1, 0.0], [0.0, 0.0, -0.5, 0]])).requires_grad_()
    loss, m = grpo_loss(new, batch, None, clip=0.2, kl_coef=0.0, old=old, tis_cap=1.5)
    # weights: row 0 e^0.3, e^-0.4; row 1 min(e^1, 1.5) = 1.5, 1, 1.  ratios vs old: row 0 e^0.1, 1 (A=2);
    # row 1 1, 1, e^-0.5 (A=-1: min(r*A, clip(r)*A) = -max(r, clip(r)) = -0.8 for r = e^-0.5)
    w = [math.exp(0.3), math.exp(-0.4), 1.5, 1.0, 1.0]
    s = [math.exp(0.1) * 2, 2.0, -1.0, -1.0, -0.8]
    assert loss.item() == pytest.approx(-sum(a * b for a, b in zip(w, s)) / 5, rel=1e-6)
    assert m["tis/capped_frac"] == pytest.approx(1 / 5)
    loss.backward()                       # d loss / d new = -w * A * r / 5 where unclipped, 0 where clipped
    assert new.grad[0, 2].item() == pytest.approx(-math.exp(0.3) * 2 * math.exp(0.1) / 5, rel=1e-5)
    assert new.grad[1, 2].item() == 0.0 and new.grad[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="old"):
        grpo_loss(new, batch, None, clip=0.2, kl_coef=0.0, tis_cap=2.0)


def test_mismatch_metrics_read_completion_tokens_only():
    batch = _batch([[-1.0, -2.0], [-0.5, -0.5, -0.5]])
    trainer = batch.old_logprobs + torch.tensor([[9.0, 9.0, 0.1, -0.2], [0.0, 0.0, 0.4, 9.0]])
    m = mismatch_metrics(trainer, batch.old_logprobs, batch.target_mask)
    assert m["mismatch/logp_diff_max"] == pytest.approx(0.4)
    assert m["mismatch/logp_diff_mean"] == pytest.approx((0.1 + 0.2 + 0.4) / 5)
    ratios = [math.exp(-0.1), math.exp(0.2), 1, 1, math.exp(-0.4)]
    assert m["mismatch/ratio_mean"] == pytest.approx(sum(ratios) / 5, rel=1e-6)
    probs = [abs(math.exp(-1) - math.exp(-0.9)), abs(math.exp(-2) - math.exp(-2.2)), 0, 0,
             abs(math.exp(-0.5) - math.exp(-0.1))]
    assert m["mismatch/probs_diff_max"] == pytest.approx(max(probs), rel=1e-5)
    k3 = [math.exp(d) - d - 1 for d in (0.1, -0.2, 0, 0, 0.4)]
    assert m["mismatch/kl"] == pytest.approx(sum(k3) / 5, rel=1e-5)
    same = mismatch_metrics(batch.old_logprobs, batch.old_logprobs, batch.target_mask)
    assert same["mismatch/logp_diff_max"] == 0.0 and same["mismatch/ratio_mean"] == pytest.approx(1.0)


def test_recipe_tis_cap():
    assert load_grpo_recipe("recipes/grpo.yaml").grpo.tis_cap is None
    assert load_grpo_recipe("recipes/grpo.yaml", ["grpo.tis_cap=2.0"]).grpo.tis_cap == 2.0
    for bad in ("0.5", "yes", "two"):
        with pytest.raises(RecipeError, match="grpo.tis_cap"):
            load_grpo_recipe("recipes/grpo.yaml", [f"grpo.tis_cap={bad}"])
