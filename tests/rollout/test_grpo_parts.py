"""GRPO's pieces against hand computations, and the launcher's refusals: group-relative advantages, the
batch's masks and the clipped surrogate with KL, the addition reward, `--help` and a bad recipe (one
`error:` line, exit 2)."""
import math
import random

import pytest
import torch

from seesaw_ds.rollout.grpo import build_batch, group_advantages, grpo_loss
from seesaw_ds.rollout.recipe import load_grpo_recipe
from seesaw_ds.rollout.rewards import addition_problems, addition_reward


def test_group_advantages_are_relative_to_the_group():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))                     # no signal in a uniform group


def test_batch_masks_and_loss_match_a_hand_computation():
    batch = build_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [[-1.0, -2.0], [-0.5, -0.5, -0.5]],
                        [2.0, -1.0], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert batch.target_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    new = batch.old_logprobs + torch.tensor([[0, 0, 0.5, 0.0], [0.0, -0.1, 0.0, 0]])
    ref = new.clone()
    loss, m = grpo_loss(new, batch, ref, clip=0.2, kl_coef=0.1)
    # row 0 (A=2): ratios e^0.5 (clipped at 1.2), 1; row 1 (A=-1): ratios 1, e^-0.1, 1
    expect = -(1.2 * 2 + 1 * 2 + -1 + -math.exp(-0.1) + -1) / 5
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert m["kl"] == pytest.approx(0.0) and m["clip_frac"] == pytest.approx(1 / 5)
    assert m["logprob_diff_max"] == pytest.approx(0.5)


def test_addition_reward():
    assert addition_reward("12", 12) == 1.5 and addition_reward(" 12.", 12) == 1.5
    assert addition_reward("The answer is 12.", 12) == 1.0
    assert addition_reward("13", 12) == 0.0 and addition_reward("twelve", 12) == 0.0
    problems = addition_problems(3, 9, random.Random(0))
    assert all(p.question.startswith("What is") and 2 <= p.answer <= 18 for p in problems)


def _launch(args, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch_rollout", "launch/rollout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_recipe_overrides_and_refusals(tmp_path, capsys):
    recipe = load_grpo_recipe("recipes/grpo.yaml", ["grpo.steps=3", "rollout.parallel={tp: 2}"])
    assert recipe.grpo.steps == 3 and recipe.rollout.parallel == {"tp": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  group_size: 1\n")
    for args in (["--config", str(bad)], ["--config", "recipes/grpo.yaml", "grpo.nope=1"],
                 ["--config", "recipes/grpo.yaml", "grpo.lr=fast"], ["--config", str(tmp_path / "missing.yaml")]):
        code, _, err = _launch(args, capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    code, out, _ = _launch(["--help"], capsys)
    assert code == 0 and "--config" in out
