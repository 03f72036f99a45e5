"""GRPO's pieces: group-relative advantages, the sequence batch, the trainer's token logprobs, the loss.

    advantages  A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one per sample, shared by its tokens
    loss        mean over completion tokens of  -min(rho * A, clip(rho, 1 - c, 1 + c) * A) + beta * KL
                rho = exp(logp_policy - logp_rollout); KL: the k3 estimator against a frozen reference
                exp(logp_ref - logp) - (logp_ref - logp) - 1 (non-negative, unbiased)

The rollout's own logprobs are the "old" policy's: the gap between them and the trainer's forward at the
start of a step is the rollout/trainer mismatch, logged every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards: [groups, n] -> advantages of the same shape (0 for a group whose samples all scored alike)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor        # [B, T] prompt + completion, right-padded
    attention_mask: torch.Tensor   # [B, T]
    target_mask: torch.Tensor      # [B, T-1] 1 where position t predicts a completion token (t+1)
    old_logprobs: torch.Tensor     # [B, T-1] the rollout's logprobs of those tokens (0 elsewhere)
    advantages: torch.Tensor       # [B]

    def slice(self, start: int, stop: int) -> "SequenceBatch":
        return SequenceBatch(*(t[start:stop] for t in (self.input_ids, self.attention_mask, self.target_mask,
                                                         self.old_logprobs, self.advantages)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def build_batch(prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]],
                advantages: list[float], pad_id: int) -> SequenceBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    b, t = len(prompts), max(lengths)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    target = torch.zeros((b, t - 1))
    old = torch.zeros((b, t - 1))
    for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs)):
        ids[i, :lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attn[i, :lengths[i]] = 1
        if c:
            target[i, len(p) - 1:len(p) - 1 + len(c)] = 1
            old[i, len(p) - 1:len(p) - 1 + len(c)] = torch.tensor(lp, dtype=torch.float32)
    return SequenceBatch(ids, attn, target, old, torch.tensor(advantages, dtype=torch.float32))


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: log p(input_ids[:, t+1] | input_ids[:, :t+1]) under `model` (fp32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def grpo_loss(new: torch.Tensor, batch: SequenceBatch, ref: torch.Tensor | None, clip: float,
              kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (+ KL) averaged over completion tokens, and its diagnostics."""
    mask = batch.target_mask
    count = mask.sum().clamp(min=1)
    ratio = torch.exp(new - batch.old_logprobs)
    adv = batch.advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    per_token = -surrogate
    kl = torch.zeros_like(new)
    if ref is not None:
        delta = ref - new
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / count
    with torch.no_grad():
        diff = (new - batch.old_logprobs).abs() * mask
        clipped = ((ratio - 1).abs() > clip).float() * mask
        metrics = {"kl": float((kl * mask).sum() / count), "clip_frac": float(clipped.sum() / count),
                   "ratio_mean": float((ratio * mask).sum() / count),
                   "logprob_diff_mean": float(diff.sum() / count), "logprob_diff_max": float(diff.max()),
                   "tokens": float(count)}
    return loss, metrics
