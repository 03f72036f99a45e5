"""The GRPO recipe (recipes/grpo.yaml): sections of typed keys, `key.sub=value` overrides, checked whole.

A bad recipe raises `RecipeError` with one line naming the key; the launcher prints it and exits 2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml



class RecipeError(ValueError):
    """A bad GRPO recipe: the message names the key."""


@dataclass
class TaskSection:
    name: str = "addition"            # seesaw_ds.rollout.rewards.TASKS
    max_operand: int = 9
    format_bonus: float = 0.5
    seed: int = 0


@dataclass
class GRPOSection:
    steps: int = 30
    prompts_per_step: int = 8         # over all ranks
    group_size: int = 4               # samples per prompt (the group of group-relative advantages)
    max_tokens: int = 8
    temperature: float = 1.0
    lr: float = 3e-5
    clip: float = 0.2
    kl_coef: float = 0.02             # 0: no frozen reference model
    micro_batch: int = 8              # sequences per forward/backward
    zero_stage: int = 0
    grad_clip: float = 1.0
    tis_cap: Any = None               # None: off; a number >= 1 (e.g. 2.0): truncated importance sampling


@dataclass
class RolloutSection:
    parallel: Any = None              # None: one inference engine per rank; else a layout over the ranks
    kv_device_gb: float = 0.25
    kv_host_gb: float = 0.25
    bucket_mb: float = 64.0
    max_num_seqs: int = 64


@dataclass
class TrackingSection:
    output_dir: str = "runs/grpo"
    wandb_project: str | None = "seesaw-grpo"
    wandb_mode: str = "offline"
    plot: str | None = None           # a PNG of the reward curve, written at the end


@dataclass
class GRPORecipe:
    model: str = "embedded:smollm2"
    dtype: str = "float32"
    task: TaskSection = field(default_factory=TaskSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise RecipeError(f"unknown recipe key {name!r} (known: {', '.join(fields)})")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING \
            else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, name)
            continue
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{name} must be a number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise RecipeError(f"{name} must be an integer, got {value!r}")
            value = type(default)(value)
        kwargs[key] = value
    return cls(**kwargs)


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key.sub=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def check(recipe: GRPORecipe) -> GRPORecipe:
    g = recipe.grpo
    for name in ("steps", "prompts_per_step", "group_size", "max_tokens", "micro_batch"):
        if getattr(g, name) < 1:
            raise RecipeError(f"grpo.{name} must be >= 1, got {getattr(g, name)}")
    if g.group_size < 2:
        raise RecipeError("grpo.group_size must be >= 2 (advantages are relative to the group)")
    if g.temperature <= 0:
        raise RecipeError(f"grpo.temperature must be > 0 for sampling, got {g.temperature}")
    if g.zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f"grpo.zero_stage must be 0-3, got {g.zero_stage}")
    if not (g.lr > 0 and 0 < g.clip < 1 and g.kl_coef >= 0):
        raise RecipeError("grpo.lr must be > 0, grpo.clip in (0, 1), grpo.kl_coef >= 0")
    if g.tis_cap is not None and (isinstance(g.tis_cap, bool) or not isinstance(g.tis_cap, (int, float))
                                  or not g.tis_cap >= 1):
        raise RecipeError(f"grpo.tis_cap must be null or a number >= 1, got {g.tis_cap!r}")
    from seesaw_ds.rollout.rewards import TASKS
    if recipe.task.name not in TASKS:
        raise RecipeError(f"task.name {recipe.task.name!r} is unknown; tasks: {', '.join(TASKS)}")
    if recipe.dtype not in ("float32", "bfloat16"):
        raise RecipeError(f"dtype must be float32 or bfloat16, got {recipe.dtype!r}")
    if recipe.rollout.bucket_mb <= 0:
        raise RecipeError("rollout.bucket_mb must be > 0")
    return recipe


def load_grpo_recipe(path: str, overrides: list[str] = ()) -> GRPORecipe:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    for item in overrides:
        _apply_override(data, item)
    return check(_build(GRPORecipe, data, ""))
