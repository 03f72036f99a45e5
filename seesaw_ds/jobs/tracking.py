"""Experiment tracking of a job on wandb (tracking.wandb.project set and mode not disabled), else nothing.

Logged: the resolved recipe (run config), throughput over time with the engine's stage and KV-tier metrics,
a table of the stage switches, a table of sample generations, and the final summary (run summary).
With no API key (WANDB_API_KEY or ~/.netrc) an `online` run is logged offline, announced; `wandb sync` uploads it.

    tracker = Tracker.for_recipe(recipe, enabled=(rank == 0), announce=print)
    tracker.attach(llm.engine)          # engine.stats / engine.scheduler are sampled on each log
    tracker.log({"rows": 10, "tokens_per_s": 123.0}); tracker.add_sample(row)
    tracker.finish(final_summary_dict)
"""
from __future__ import annotations

import netrc
import os
import time
import urllib.parse
from typing import Any, Callable

from seesaw_ds.jobs.recipe import Recipe

SAMPLE_COLUMNS = ("id", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens")
MAX_SAMPLE_CHARS = 2000


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(recipe_mode: str, env: dict | None = None, has_key: Callable[[], bool] = has_wandb_api_key) -> str:
    """WANDB_MODE wins when set; `online` without an API key becomes `offline`."""
    env = os.environ if env is None else env
    mode = (env.get("WANDB_MODE") or recipe_mode).lower()
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode == "online" and not has_key():
        return "offline"
    return mode


def engine_metrics(engine: Any) -> dict[str, float]:
    """A log line's numbers: the engine's stats (`engine/...`, with its stage) and KV tiers (`kv/...`)."""
    stats = engine.stats
    metrics = {f"engine/{k}": v for k, v in stats.summary().items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["engine/stage_is_decode"] = float(stats.stage == "decode")
    metrics.update({f"kv/{k}": v for k, v in engine.kv_metrics.items() if isinstance(v, (int, float))})
    return metrics


class Tracker:
    def __init__(self, run=None, samples: int = 16, announce: Callable[[str], None] = print):
        self.run, self.max_samples, self.announce = run, samples, announce
        self.engine = None
        self.samples: list[dict] = []
        self.start = time.monotonic()

    @classmethod
    def for_recipe(cls, recipe: Recipe, enabled: bool, announce: Callable[[str], None] = print,
                   extra_config: dict | None = None) -> "Tracker":
        cfg = recipe.tracking.wandb
        if not enabled or not cfg.project:
            return cls(None)
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return cls(None)
        if mode == "offline" and cfg.mode == "online" and not os.environ.get("WANDB_MODE"):
            announce("wandb: no API key (WANDB_API_KEY or ~/.netrc): logging offline; upload later with `wandb sync`")
        import wandb
        run = wandb.init(project=cfg.project, name=cfg.name, mode=mode, config=recipe.to_dict() | (extra_config or {}),
                         job_type="generate")
        announce(f"wandb: run {run.id} ({mode}) in {run.dir}")
        return cls(run, cfg.samples, announce)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def log(self, metrics: dict) -> None:
        if self.run is None:
            return
        line = {f"job/{k}": v for k, v in metrics.items()} | {"job/elapsed_s": time.monotonic() - self.start}
        if self.engine is not None:
            line |= engine_metrics(self.engine)
        self.run.log(line)

    def add_sample(self, row: dict) -> None:
        if self.run is not None and len(self.samples) < self.max_samples:
            self.samples.append(row)

    def _sample_table(self):
        import wandb
        extra = sorted({k for row in self.samples for k in row} - set(SAMPLE_COLUMNS) - {
            "row_index", "prompt_token_ids", "completion_token_ids", "logprobs", "model", "layouts", "seed",
            "temperature", "top_k", "top_p", "max_tokens"})
        columns = list(SAMPLE_COLUMNS) + extra
        clip = lambda v: v[:MAX_SAMPLE_CHARS] if isinstance(v, str) else v  # noqa: E731
        return wandb.Table(columns=columns, data=[[clip(row.get(c)) for c in columns] for row in self.samples])

    def _switch_table(self):
        import wandb
        switches = list(self.engine.stats.switches) if self.engine is not None else []
        columns = ["index", "to", "seconds", "host_occupancy", "weight_bytes"]
        return wandb.Table(columns=columns, data=[[i, s.get("to"), s.get("seconds"), s.get("host_occupancy"),
                                                   s.get("weight_bytes")] for i, s in enumerate(switches)])

    def finish(self, summary: dict) -> None:
        """Log the tables and put `summary` (flat or nested numbers/strings) into the run summary."""
        if self.run is None:
            return
        self.run.log({"samples": self._sample_table(), "stage_switches": self._switch_table()})
        self.run.summary.update(summary)
        self.run.finish()
        self.run = None
