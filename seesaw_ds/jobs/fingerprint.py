"""A job's fingerprint: every recipe part that decides what the output rows contain, as a flat dict kept in
the output folder's manifest, and the changes between two of them in words (a resume refuses a folder whose
rows another fingerprint made)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from seesaw_ds.jobs.recipe import Recipe
from seesaw_ds.jobs.schema import flatten, to_plain


def resolved_dtype(name: str) -> str:
    """`auto` as the dtype it picks on this machine (rows made in bf16 and in fp32 differ)."""
    if name != "auto":
        return name
    from seesaw_ds.models.config import parse_dtype
    return str(parse_dtype(name)).replace("torch.", "")


def job_fingerprint(recipe: Recipe, source_used: str, model_content: str | None = None,
                    data_content: str | None = None) -> dict[str, Any]:
    """Flat {dotted key: value} of every recipe part that decides what the rows contain; `model_content` and
    `data_content` (jobs/identity.py) name the bytes behind model.name and data.source."""
    data = to_plain(recipe.data)
    for key in ("streaming", "fallback"):  # how rows are read, not which rows
        data.pop(key)
    data["source"] = source_used
    if data_content is not None:
        data["content"] = data_content
    model = {"name": recipe.model.name, "dtype": resolved_dtype(recipe.model.dtype)}
    if model_content is not None:
        model["content"] = model_content
    tree = {"model": model,
            "sampling": to_plain(recipe.sampling), "data": data,
            "engine": {"max_model_len": recipe.engine.max_model_len},
            "output": {"token_ids": recipe.output.token_ids}}
    return json.loads(json.dumps(flatten(tree), sort_keys=True))  # NOTE: JSON-normalised, as in the manifest


# Policies whose values give the same rows: `error` stops the job at a row that `skip` would leave out, so
# the rows written before the error are exactly the ones `skip` writes (a folder is resumable under either).
SAME_ROWS_VALUES = {"data.bad_rows": frozenset({"skip", "error"}), "data.over_limit": frozenset({"skip", "error"})}


# Keys a manifest written before they existed lacks; such a manifest made its rows with this value.
UNSET_MEANS = {"sampling.n": 1}


CONTENT_KEYS = {"model.content": lambda fp: f"the model's weights at {fp.get('model.name')}",
                "data.content": lambda fp: f"the data at {fp.get('data.source')}"}


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in SAME_ROWS_VALUES and {old.get(key), new.get(key)} <= SAME_ROWS_VALUES[key]:
            continue
        unset = UNSET_MEANS.get(key, "(unset)")
        if old.get(key, unset) != new.get(key, unset):
            before, after = (json.dumps(d.get(key, unset)) if key in d or key in UNSET_MEANS else "(unset)"
                             for d in (old, new))
            what = CONTENT_KEYS.get(key)
            if what is not None and key in old and key in new:
                changes.append(f"{what(new)} changed since these rows were made ({key} was {before}, now {after})")
            else:
                changes.append(f"{key} changed from {before} to {after}")
    return changes


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
