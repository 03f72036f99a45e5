"""A small synchronous GRPO loop: rollout from the live policy, score, train one step, repeat.

    step: [generating(): sync weights -> n samples per prompt, logprobs] -> rewards -> group advantages
          -> micro-batches: policy forward (+ frozen reference) -> clipped surrogate (+ KL) -> optimizer step

One optimizer step per rollout: each micro-batch's policy forward is the pre-update ("old") policy, so
its detached logprobs against the rollout's give the rollout/trainer mismatch metrics of every step
(`mismatch/*`), and with `grpo.tis_cap` the truncated importance weights.

Every rank is a training rank of one DeepSpeed engine (data parallel) and a rollout rank: with
`rollout.parallel` unset each rank generates its own share of the prompts with its own engine; with a layout
the ranks form one engine, generate every prompt and each trains on its share of the groups.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time

import torch

from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.rollout.grpo import (SequenceBatch, build_batch, group_advantages, grpo_loss, mismatch_metrics,
                                    token_logprobs)
from seesaw_ds.rollout.recipe import GRPORecipe
from seesaw_ds.rollout.rewards import TASKS


def _chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _one_process_world() -> None:
    """Without a launcher (`python launch/rollout.py`): the environment of a one-rank world, on a free port."""
    if "RANK" in os.environ or torch.distributed.is_initialized():
        return
    from seesaw_ds.distributed.node import free_port
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _over_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    """Every rank's metrics -> one record: `*_max` keys their maximum, the others their mean."""
    if world == 1:
        return values
    out = {}
    for op, keys in ((torch.distributed.ReduceOp.MAX, sorted(k for k in values if k.endswith("_max"))),
                     (torch.distributed.ReduceOp.SUM, sorted(k for k in values if not k.endswith("_max")))):
        if not keys:
            continue
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=op)
        scale = 1 if op == torch.distributed.ReduceOp.MAX else world
        out.update({k: float(v) / scale for k, v in zip(keys, t)})
    return out


class GRPOLoop:
    def __init__(self, recipe: GRPORecipe, announce=print):
        import deepspeed
        from transformers import AutoModelForCausalLM

        from seesaw_ds.distributed.builder import init_distributed
        from seesaw_ds.models.config import parse_dtype
        from seesaw_ds.models.loader import default_cache_dir, load_tokenizer, resolve_model_folder
        from seesaw_ds.rollout.engine import RolloutEngine

        self.recipe, self.announce = recipe, announce
        _one_process_world()
        init_distributed()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        g = recipe.grpo
        if g.prompts_per_step % self.world:
            raise ValueError(f"grpo.prompts_per_step={g.prompts_per_step} must divide over {self.world} ranks")
        dtype = parse_dtype(recipe.dtype)
        folder = resolve_model_folder(recipe.model, default_cache_dir()) if self.rank == 0 else None
        if self.world > 1:
            torch.distributed.barrier()
            folder = resolve_model_folder(recipe.model, default_cache_dir())
        self.tokenizer = load_tokenizer(folder)
        policy = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.reference = None
        if g.kl_coef > 0:
            self.reference = copy.deepcopy(policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        per_rank = g.prompts_per_step // self.world if recipe.rollout.parallel is None else \
            -(-g.prompts_per_step // self.world)
        sequences = per_rank * g.group_size
        micro = min(g.micro_batch, sequences)
        if sequences % micro:
            raise ValueError(f"grpo.micro_batch={micro} must divide the {sequences} sequences per rank")
        self.micro, self.gas = micro, sequences // micro
        ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": self.gas,
                     "train_batch_size": micro * self.gas * self.world, "gradient_clipping": g.grad_clip,
                     "zero_optimization": {"stage": g.zero_stage}, "zero_allow_untested_optimizer": True}
        optimizer = torch.optim.AdamW(policy.parameters(), lr=g.lr, weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_config)
        r = recipe.rollout
        self.rollout = RolloutEngine(self.engine, self.tokenizer, parallel=r.parallel,
                                     model=folder if r.parallel is not None else None, dtype=dtype,
                                     bucket_bytes=int(r.bucket_mb * (1 << 20)), kv_device_gb=r.kv_device_gb,
                                     kv_host_gb=r.kv_host_gb, max_num_seqs=r.max_num_seqs, max_model_len=512)
        self.make_problems, self.reward_fn = TASKS[recipe.task.name]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.history: list[dict] = []

    def _problems(self, step: int):
        g, t = self.recipe.grpo, self.recipe.task
        rng = random.Random(t.seed * 1_000_003 + step)
        problems = self.make_problems(g.prompts_per_step, t.max_operand, rng)
        if self.recipe.rollout.parallel is None:             # each rank its own share
            share = g.prompts_per_step // self.world
            return problems[self.rank * share:(self.rank + 1) * share]
        return problems

    def step(self, step: int) -> dict:
        """One RL step: rollout, then one optimizer step on it; the step's record (also kept in history)."""
        batch, info = self.rollout_phase(step)
        record = self.train_phase(batch, info)
        record["step"] = step
        self.history.append(record)
        return record

    def rollout_phase(self, step: int) -> tuple[SequenceBatch, dict]:
        """Sync + generate inside `generating()`, score, and this rank's training batch with advantages."""
        g = self.recipe.grpo
        problems = self._problems(step)
        prompts = [{"prompt_token_ids": _chat_ids(self.tokenizer, p.question)} for p in problems]
        params = SamplingParams(temperature=g.temperature, max_tokens=g.max_tokens, logprobs=0,
                                seed=self.recipe.task.seed * 7919 + step * 131 + self.rank)
        t0 = time.perf_counter()
        with self.rollout.generating():
            outs = self.rollout.generate(prompts, params, n=g.group_size)
        rollout_s = time.perf_counter() - t0
        rewards = torch.tensor([[self.reward_fn(s.text, p.answer, self.recipe.task.format_bonus) for s in o.samples]
                                for o, p in zip(outs, problems)])
        advantages = group_advantages(rewards)
        rows = range(len(outs)) if self.recipe.rollout.parallel is None else range(self.rank, len(outs), self.world)
        prompt_ids, completions, logprobs, adv = [], [], [], []
        for i in rows:
            for j, s in enumerate(outs[i].samples):
                prompt_ids.append(outs[i].prompt_token_ids)
                completions.append(s.token_ids)
                logprobs.append(s.logprobs)
                adv.append(float(advantages[i, j]))
        batch = build_batch(prompt_ids, completions, logprobs, adv, self.pad_id)
        info = {"rollout_s": rollout_s, "reward_mean": float(rewards.mean()),
                "correct_frac": float((rewards >= 1).float().mean()),
                "completion_tokens": float(sum(len(c) for c in completions)),
                "sample": outs[0].samples[0].text[:200]}
        return batch, info

    def train_phase(self, batch: SequenceBatch, info: dict) -> dict:
        """One optimizer step over the batch's micro-batches; the step's metrics over all ranks."""
        from seesaw_ds.distributed.builder import release_freed_host_memory
        g = self.recipe.grpo
        t1 = time.perf_counter()
        self.engine.train()
        sums: dict[str, float] = {}
        for k in range(self.gas):
            mb = batch.slice(k * self.micro, (k + 1) * self.micro)
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = token_logprobs(self.reference, mb.input_ids, mb.attention_mask)
            new = token_logprobs(self.engine, mb.input_ids, mb.attention_mask)
            old = new.detach()                   # NOTE: no optimizer step yet this RL step: the old policy
            loss, metrics = grpo_loss(new, mb, ref, g.clip, g.kl_coef, old=old if g.tis_cap is not None else None,
                                      tis_cap=g.tis_cap)
            self.engine.backward(loss)
            self.engine.step()
            metrics.update(mismatch_metrics(old, mb.old_logprobs, mb.target_mask))
            metrics["loss"] = float(loss.detach())
            for key, value in metrics.items():
                sums[key] = max(sums.get(key, value), value) if key.endswith("_max") else sums.get(key, 0) + value
        release_freed_host_memory()      # activations and grads: heap pages back to the OS before the next rollout
        train_s = time.perf_counter() - t1
        local = {k: (v if k.endswith("_max") else v / self.gas) for k, v in sums.items()}
        local.update({k: info[k] for k in ("reward_mean", "correct_frac", "completion_tokens")})
        record = _over_ranks(local, self.world)
        rollout_s = info["rollout_s"]
        sync = self.rollout.weight_sync.history[-1]
        record.update({"rollout_s": rollout_s, "train_s": train_s, "rollout_share": rollout_s / (rollout_s + train_s),
                       "rollout_tokens_per_s": self.rollout.last_generate["tokens_per_s"],
                       "sync_s": sync.seconds, "sync_gather_s": sync.gather_seconds, "sync_bytes": sync.nbytes,
                       "rss_gb_inside": self.rollout.memory["inside"] / 2**30,
                       "rss_gb_outside": self.rollout.memory["after"] / 2**30, "sample": info["sample"]})
        return record

    def close(self) -> None:
        self.rollout.close()


def run(recipe: GRPORecipe, announce=print) -> list[dict]:
    """The whole loop with its tracking (rank 0: wandb run, metrics.jsonl, the reward curve's PNG)."""
    loop = GRPOLoop(recipe, announce)
    tr = recipe.tracking
    run_ = None
    main = loop.rank == 0
    if main:
        os.makedirs(tr.output_dir, exist_ok=True)
        if tr.wandb_project and tr.wandb_mode != "disabled":
            import wandb
            run_ = wandb.init(project=tr.wandb_project, mode=os.environ.get("WANDB_MODE", tr.wandb_mode),
                              dir=tr.output_dir, config=recipe.as_dict())
    try:
        with open(os.path.join(tr.output_dir, "metrics.jsonl"), "a") if main else open(os.devnull, "w") as log:
            for step in range(recipe.grpo.steps):
                record = loop.step(step)
                if main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    announce(f"step {step}: reward {record['reward_mean']:.3f} correct {record['correct_frac']:.2f} "
                             f"kl {record['kl']:.4f} rollout {record['rollout_s']:.1f}s "
                             f"({record['rollout_tokens_per_s']:.0f} tok/s) train {record['train_s']:.1f}s "
                             f"sync {record['sync_s']:.3f}s mismatch {record['mismatch/logp_diff_mean']:.2e}/"
                             f"{record['mismatch/logp_diff_max']:.2e} | {record['sample']!r}")
                    if run_ is not None:
                        run_.log({k: v for k, v in record.items() if k != "sample"}, step=step)
    finally:
        loop.close()
        if run_ is not None:
            run_.finish()
    if main and tr.plot:
        plot_rewards(loop.history, tr.plot, title=f"GRPO on {recipe.task.name}, {recipe.model}")
    return loop.history


def plot_rewards(history: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["reward_mean"] for r in history], label="reward mean")
    ax.plot(steps, [r["correct_frac"] for r in history], label="correct fraction")
    ax.set_xlabel("RL step")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
