"""GRPO's pieces: group-relative advantages, the sequence batch, the trainer's token logprobs, the loss.

    advantages  A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one per sample, shared by its tokens
    loss        mean over completion tokens of  -min(rho * A, clip(rho, 1 - c, 1 + c) * A) + beta * KL
                rho = exp(logp_policy - logp_rollout); KL: the k3 estimator against a frozen reference
                exp(logp_ref - logp) - (logp_ref - logp) - 1 (non-negative, unbiased)

By default the rollout's own logprobs are the "old" policy's: rho = exp(logp_policy - logp_rollout) carries
the rollout/trainer mismatch into the ratio, where the PPO clip bounds it. With truncated importance
sampling (TIS, as in veRL / OpenRLHF) the old policy is the trainer's own forward before the update and the
mismatch becomes a separate, capped, detached per-token weight on the surrogate:

    rho = exp(logp_policy - logp_old)        w = min(exp(logp_old - logp_rollout), cap)
    loss = mean over completion tokens of  -w * min(rho * A, clip(rho, 1 - c, 1 + c) * A) + beta * KL

The gap between the rollout's logprobs and the trainer's forward at the start of a step is the
rollout/trainer mismatch (`mismatch_metrics`), logged every step.
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


def tis_weights(old: torch.Tensor, rollout: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(exp(old - rollout), cap), detached: old, rollout [B, T-1] token
    logprobs under the trainer's pre-update forward and the rollout engine. 1 where they agree."""
    return torch.exp(old.detach() - rollout.detach()).clamp(max=cap)


def mismatch_metrics(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Rollout vs trainer token logprobs ([B, T-1], over `mask`'s completion tokens), as the peers log them:
    |logp diff| mean / max (TRL's sampling_logp_difference), |p diff| mean / max (veRL's
    rollout_probs_diff), the mean token probability ratio exp(logp_rollout - logp_trainer) (NeMo-RL's
    token_mult_prob_error) and the k3 KL(rollout || trainer) estimate (OpenRLHF's vllm_kl)."""
    with torch.no_grad():
        trainer, rollout = trainer.detach().float(), rollout.detach().float()
        count = mask.sum().clamp(min=1)
        on = mask > 0
        logp_diff = (rollout - trainer).abs()
        prob_diff = (rollout.exp() - trainer.exp()).abs()
        ratio = torch.exp(rollout - trainer)
        delta = trainer - rollout
        k3 = torch.exp(delta) - delta - 1

        def mean(x):
            return float((x * mask).sum() / count)

        def peak(x):
            return float(x[on].max()) if on.any() else 0.0

        return {"mismatch/logp_diff_mean": mean(logp_diff), "mismatch/logp_diff_max": peak(logp_diff),
                "mismatch/probs_diff_mean": mean(prob_diff), "mismatch/probs_diff_max": peak(prob_diff),
                "mismatch/ratio_mean": mean(ratio), "mismatch/kl": mean(k3)}


def grpo_loss(new: torch.Tensor, batch: SequenceBatch, ref: torch.Tensor | None, clip: float,
              kl_coef: float, old: torch.Tensor | None = None, tis_cap: float | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (+ KL) averaged over completion tokens, and its diagnostics.

    `old`: the trainer's pre-update logprobs [B, T-1] (default: the rollout's); `tis_cap`: weight each
    token's surrogate by `tis_weights(old, rollout, tis_cap)` (needs `old`)."""
    mask = batch.target_mask
    count = mask.sum().clamp(min=1)
    if tis_cap is not None and old is None:
        raise ValueError("grpo_loss: tis_cap needs the trainer's old logprobs (old=)")
    old = batch.old_logprobs if old is None else old.detach()
    ratio = torch.exp(new - old)
    adv = batch.advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    weight = None
    if tis_cap is not None:
        weight = tis_weights(old, batch.old_logprobs, tis_cap)
        surrogate = weight * surrogate
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
        if weight is not None:
            metrics["tis/weight_mean"] = float((weight * mask).sum() / count)
            metrics["tis/capped_frac"] = float(((weight >= tis_cap).float() * mask).sum() / count)
    return loss, metrics
