"""Checks a job runs at start-up, before any weight is loaded, so that a bad model, length or memory budget
ends with one line naming the recipe key instead of a traceback or a stop at the first row that does not fit.

    check_model_spec(recipe)                       # model.name: a readable GGUF, a reachable hub
    check_engine_fits(recipe, cfg, layouts)        # max_model_len, logprobs, KV budgets of every rank
"""
from __future__ import annotations

import os

from seesaw_ds.jobs.schema import RecipeError


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def check_model_spec(recipe) -> None:
    """model.name, before it is resolved (converted, downloaded): a GGUF file must be whole; a hub id needs
    the hub (or offline mode with a cached copy)."""
    spec = recipe.model.name
    if spec.endswith(".gguf") and os.path.isfile(spec):
        import gguf
        try:
            gguf.GGUFReader(spec)
        except Exception as err:  # noqa: BLE001 - any parse failure means an unreadable file
            raise RecipeError("model.name", f"{spec} is not a readable GGUF file ({_one_line(err)}); a "
                                            f"truncated download? ({os.path.getsize(spec)} bytes)") from None
        return
    from seesaw_ds.models.loader import resolve_model_folder
    looks_local = spec.startswith(("embedded:", ".", "/", "~")) or os.path.exists(spec)
    if looks_local or os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        resolve_model_folder(spec, recipe.model.cache_dir)    # a malformed path raises here, cheaply
    except FileNotFoundError:
        return                                                # reported by the resolve that follows
    from seesaw_ds.jobs.sources import hub_reachable
    reachable, reason = hub_reachable()
    if not reachable:
        raise RecipeError("model.name", f"{spec} is not a local folder or file, so it is a hub id, and the hub "
                                        f"cannot be reached ({reason}); use a local model folder, or set "
                                        f"HF_HUB_OFFLINE=1 to use a cached copy")


def kv_budget_problems(cfg, layouts, *, device_gb: float, host_gb: float, max_model_len: int, block_size: int,
                       dtype, single_process: bool) -> list[tuple[str, str]]:
    """(recipe key, problem) for each KV budget that cannot hold one max_model_len sequence on some rank:
    the device pool of every decode rank (the whole model on one process), and the host store when the
    layouts switch. The same rule as the engine builder's, over every rank instead of this one."""
    from seesaw_ds.distributed.builder import check_kv_budget
    from seesaw_ds.parallel.kv_plan import kv_ownership
    problems: list[tuple[str, str]] = []

    def check(key: str, gb: float, rect=None, who: str = "") -> None:
        try:
            check_kv_budget(cfg, key, gb, max_model_len, block_size, dtype,
                            rect.layers if rect else None, rect.heads if rect else None)
        except ValueError as err:
            problems.append((f"engine.{key}", f"engine.{err}{who}"))

    if single_process or layouts is None:
        check("kv.device_gb", device_gb)
        return problems
    rects = kv_ownership(cfg, layouts.decode)
    largest = max(range(len(rects)), key=lambda r: len(rects[r].layers) * len(rects[r].heads))
    check("kv.device_gb", device_gb, rects[largest], f" (decode rank {largest} of {len(rects)})")
    if not layouts.is_static:
        check("kv.host_gb", host_gb, None, f" (host store of {len(rects)} ranks)")
    return problems


def check_engine_fits(recipe, cfg, layouts, single_process: bool) -> None:
    """engine.max_model_len within the model's positions, sampling.logprobs within its vocabulary, and KV
    budgets that hold one max_model_len sequence on every rank."""
    engine = recipe.engine
    if engine.max_model_len > cfg.max_position:
        raise RecipeError("engine.max_model_len", f"is {engine.max_model_len}, above the model's "
                                                  f"max_position_embeddings {cfg.max_position}")
    logprobs = recipe.sampling.logprobs
    if logprobs is not None and logprobs > cfg.vocab_size:
        raise RecipeError("sampling.logprobs", f"is {logprobs}, above the model's vocabulary of "
                                               f"{cfg.vocab_size} tokens")
    from seesaw_ds.engine.config import EngineConfig
    from seesaw_ds.models.config import parse_dtype
    problems = kv_budget_problems(cfg, layouts, device_gb=engine.kv.device_gb, host_gb=engine.kv.host_gb,
                                  max_model_len=engine.max_model_len, block_size=EngineConfig.block_size,
                                  dtype=parse_dtype(recipe.model.dtype), single_process=single_process)
    if problems:
        raise RecipeError("", problems[0][1])     # the text starts with the key: engine.kv.device_gb=...
