"""Input rows -> prompt items: column mapping, prompt rendering, tokenisation, length policies, replica split.

    source = open_inputs(recipe, tokenizer, replica=0, num_replicas=1)
    for item in source.items(skip_ids=writer.done_ids): ...
    source.stats.skipped   # Counter of skip reasons

Each row (after data.limit) belongs to exactly one replica whatever the batching: replica_split.py deals
every window of consecutive rows so the replicas' prompt sizes come out even.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Callable, Iterator

import datasets

from seesaw_ds.jobs.outputs import RESERVED_COLUMNS
from seesaw_ds.jobs.prompts import PromptRenderer, RenderedPrompt, RowProblem, TooLong
from seesaw_ds.jobs.recipe import Recipe
from seesaw_ds.jobs.replica_split import Dealer, rows_dealt, window_rows
from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.jobs.sources import LoadedSource, load_source

# skip reasons counted in InputStats.skipped
EMPTY_PROMPT, NON_TEXT, BAD_MAX_TOKENS, BAD_ID = "empty prompt", "non-text prompt", "bad max_tokens", "bad id"
OVER_LIMIT, UNDER_MIN = "over limit", "under min_prompt_tokens"


@dataclasses.dataclass(frozen=True)
class PromptItem:
    row_index: int                  # position in the source (after data.limit)
    row_id: str                     # data.columns.id, or the zero-padded row index
    prompt_text: str
    prompt_token_ids: list[int]
    max_tokens: int
    extra: dict[str, Any]           # data.columns.carry values


class InputError(ValueError):
    pass


@dataclasses.dataclass
class InputStats:
    yielded: int = 0
    already_done: int = 0
    truncated: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_skipped_row: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, row_index: int) -> None:
        self.skipped[reason] += 1
        self.first_skipped_row.setdefault(reason, row_index)

    @property
    def handled(self) -> int:
        """Rows of this replica consumed so far, whatever became of them."""
        return self.yielded + self.already_done + sum(self.skipped.values())


def _row_problem_reason(problem: RowProblem) -> str:
    return {"empty": EMPTY_PROMPT, "non_text": NON_TEXT}.get(problem.kind, NON_TEXT)


class PromptSource:
    """The rows of one replica as PromptItems, with counts of what was skipped and why."""

    def __init__(self, recipe: Recipe, tokenizer, loaded: LoadedSource, replica: int = 0, num_replicas: int = 1):
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica {replica} is outside 0..{num_replicas - 1}")
        self.recipe, self.tokenizer, self.loaded = recipe, tokenizer, loaded
        self.replica, self.num_replicas = replica, num_replicas
        self.data = recipe.data
        self.renderer = PromptRenderer(recipe.data, tokenizer)
        self.stats = InputStats()
        for name in self.data.columns.carry:
            if name in RESERVED_COLUMNS:
                raise RecipeError("data.columns.carry", f"column {name!r} would collide with an output column")
        columns = loaded.dataset.column_names
        if columns is not None:
            self._check_columns(columns)
            loaded = dataclasses.replace(loaded, dataset=loaded.dataset.select_columns(self._needed_columns()))
            self.loaded = loaded
        self._columns_checked = columns is not None
        if loaded.num_rows == 0:
            raise InputError(f"data.source {loaded.name} has no rows" + (
                f" (data.split {self.data.split!r})" if self.data.split != "train" else "") + "; nothing to do")
        if self.data.columns.id is not None and isinstance(self.loaded.dataset, datasets.Dataset):
            check_unique_ids(self.loaded.dataset, self.data.columns.id)

    # ---- setup checks --------------------------------------------------------------------------------------
    def _needed_columns(self) -> list[str]:
        c = self.data.columns
        named = [c.prompt, c.messages, c.prompt_token_ids, c.id, c.max_tokens, *c.carry,
                 *self.data.template_fields()]
        return list(dict.fromkeys(n for n in named if n is not None))

    def _check_columns(self, columns) -> None:
        c, where = self.data.columns, f"source {self.loaded.name}"
        available = ", ".join(columns)
        for key, name in (("prompt", c.prompt), ("messages", c.messages), ("prompt_token_ids", c.prompt_token_ids),
                          ("id", c.id), ("max_tokens", c.max_tokens)):
            if name is not None and name not in columns:
                raise RecipeError(f"data.columns.{key}", f"names column {name!r}, which {where} does not have "
                                                         f"(columns: {available})")
        for name in c.carry:
            if name not in columns:
                raise RecipeError("data.columns.carry", f"names column {name!r}, which {where} does not have "
                                                        f"(columns: {available})")
        for name in self.data.template_fields():
            if name not in columns:
                raise RecipeError("data.template", f"field {{{name}}} is not a column of {where} "
                                                   f"(columns: {available})")

    # ---- sizes and types -------------------------------------------------------------------------------------
    def rows_for_replica(self) -> int | None:
        n = self.loaded.num_rows
        return None if n is None else rows_dealt(n, self.replica, self.num_replicas)

    def carry_types(self) -> dict[str, Any]:
        """Arrow type of each carried column from the source's features (None where unknown)."""
        features = self.loaded.dataset.features
        types: dict[str, Any] = {}
        for name in self.data.columns.carry:
            if features is not None and name in features:
                types[name] = datasets.Features({name: features[name]}).arrow_schema.field(name).type
            else:
                types[name] = None
        return types

    # ---- rows -> items -----------------------------------------------------------------------------------------
    def items(self, skip_ids: set[str] | frozenset = frozenset()) -> Iterator[PromptItem]:
        """This replica's rows in source order, minus `skip_ids` (rows already written) and skipped rows."""
        seen_ids: dict[str, int] = {}  # NOTE: only with data.columns.id; every replica's rows, so an id that
        for index, row, mine, prompt in self._dealt_rows():     # two replicas share is caught by both
            if not self._columns_checked:
                self._check_columns(list(row))
                self._columns_checked = True
            try:
                row_id = self._row_id(index, row)
            except RowProblem as problem:
                if mine:
                    self._bad_row(BAD_ID, index, problem.detail, self.data.bad_rows)
                continue
            if self.data.columns.id is not None:
                if row_id in seen_ids:
                    raise _repeated_id(index, row_id, self.data.columns.id, seen_ids[row_id])
                seen_ids[row_id] = index
            if not mine:
                continue
            if row_id in skip_ids:
                self.stats.already_done += 1
                continue
            item = self._build(index, row_id, row, prompt)
            if item is not None:
                self.stats.yielded += 1
                yield item

    def _dealt_rows(self) -> Iterator[tuple[int, dict, bool, RenderedPrompt | None]]:
        """(index, row, whether this replica owns it, its prompt as sizing rendered it or None) for every source
        row, in source order (replica_split.py); one replica sizes nothing."""
        dealer, rows = Dealer(self.num_replicas), enumerate(self.loaded.dataset)
        while window := list(itertools.islice(rows, window_rows(self.num_replicas))):
            sized = [self._sized_prompt(row) if self.num_replicas > 1 else (0, None) for _, row in window]
            owners = dealer.deal([tokens for tokens, _ in sized])
            for (index, row), owner, (_, prompt) in zip(window, owners, sized):
                yield index, row, owner == self.replica, prompt

    def _sized_prompt(self, row: dict) -> tuple[int, RenderedPrompt | None]:
        """(the prompt tokens a row would run with, its rendered prompt or None where rendering failed), without
        side effects: 0 tokens for a row that would be skipped, the limit for one that would be truncated."""
        try:
            limit = self._prompt_limit(self._max_tokens(row))
            prompt = self.renderer.render(row, self.renderer.max_chars(limit))
        except RowProblem:
            return 0, None
        except TooLong:
            prompt, n = None, limit + 1
        else:
            n = len(prompt.token_ids)
        if n > limit:
            return (max(limit, 0) if self.data.over_limit == "truncate" else 0), prompt
        return (n if n >= max(self.data.min_prompt_tokens, 1) else 0), prompt

    def _prompt_limit(self, max_tokens: int) -> int:
        """The most prompt tokens a row with `max_tokens` to generate may run with."""
        room = self.recipe.engine.max_model_len - max_tokens
        return room if self.data.max_prompt_tokens is None else min(self.data.max_prompt_tokens, room)

    def _row_id(self, index: int, row: dict) -> str:
        if self.data.columns.id is None:
            return f"{index:08d}"
        value = row[self.data.columns.id]
        if value is None or isinstance(value, (list, dict)) or str(value) == "":
            raise RowProblem("bad_id", f"column {self.data.columns.id!r} holds {value!r}, not an id")
        return str(value)

    def _max_tokens(self, row: dict) -> int:
        column = self.data.columns.max_tokens
        if column is None:
            return self.recipe.sampling.max_tokens
        value = row[column]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RowProblem("max_tokens", f"column {column!r} holds {value!r}, not a positive int")
        return value

    def _bad_row(self, reason: str, index: int, detail: str, policy: str) -> None:
        if policy == "error":
            raise InputError(f"data row {index}: {detail} ({reason}; source {self.loaded.name})")
        self.stats.skip(reason, index)

    def _build(self, index: int, row_id: str, row: dict, prompt: RenderedPrompt | None = None) -> PromptItem | None:
        """The row's item, or None where it is skipped; `prompt`: its render at this limit, if already made."""
        try:
            max_tokens = self._max_tokens(row)
        except RowProblem as problem:
            self._bad_row(BAD_MAX_TOKENS, index, problem.detail, self.data.bad_rows)
            return None
        limit = self._prompt_limit(max_tokens)
        try:
            if prompt is None:
                prompt = self.renderer.render(row, self.renderer.max_chars(limit))
        except RowProblem as problem:
            self._bad_row(_row_problem_reason(problem), index, problem.detail, self.data.bad_rows)
            return None
        except TooLong as long:
            detail = (f"id {row_id!r}: prompt of {long.chars} characters is far over the limit of {limit} tokens "
                      f"(engine.max_model_len {self.recipe.engine.max_model_len} - max_tokens {max_tokens}; not "
                      f"tokenized)")
            if self.data.over_limit != "truncate":
                self._bad_row(OVER_LIMIT, index, detail, self.data.over_limit)
                return None
            prompt = None
        if prompt is None:  # a huge prompt to truncate (by characters first)
            prompt = self.renderer.truncate(row, None, limit) if limit >= 1 else None
            if prompt is None:
                self.stats.skip(OVER_LIMIT, index)
                return None
            self.stats.truncated += 1
        if len(prompt.token_ids) > limit:
            detail = (f"prompt of {len(prompt.token_ids)} tokens is over the limit of {limit} "
                      f"(engine.max_model_len {self.recipe.engine.max_model_len} - max_tokens {max_tokens}"
                      + (f", data.max_prompt_tokens {self.data.max_prompt_tokens})" if self.data.max_prompt_tokens
                         else ")"))
            if self.data.over_limit != "truncate":
                self._bad_row(OVER_LIMIT, index, detail, self.data.over_limit)
                return None
            prompt = self.renderer.truncate(row, prompt, limit) if limit >= 1 else None
            if prompt is None:
                self.stats.skip(OVER_LIMIT, index)
                return None
            self.stats.truncated += 1
        if len(prompt.token_ids) < max(self.data.min_prompt_tokens, 1):
            self.stats.skip(UNDER_MIN if prompt.token_ids else EMPTY_PROMPT, index)
            return None
        extra = {name: row[name] for name in self.data.columns.carry}
        return PromptItem(index, row_id, prompt.text, list(prompt.token_ids), max_tokens, extra)


def _repeated_id(index: int, row_id: str, column: str, first: int) -> InputError:
    return InputError(f"data row {index}: id {row_id!r} (column {column!r}) repeats an earlier row (data row "
                      f"{first}); ids must be unique")


def check_unique_ids(dataset, column: str) -> None:
    """At start-up, for an in-memory source: the first repeated id (rows of every replica), as InputError."""
    seen: dict[str, int] = {}
    for index, value in enumerate(dataset[column]):
        if value is None or isinstance(value, (list, dict)) or str(value) == "":
            continue          # a bad id: counted (or refused) at its row
        if str(value) in seen:
            raise _repeated_id(index, str(value), column, seen[str(value)])
        seen[str(value)] = index


def open_inputs(recipe: Recipe, tokenizer, *, replica: int = 0, num_replicas: int = 1,
                announce: Callable[[str], None] = print) -> PromptSource:
    """Load recipe.data (announcing a fallback) and return this replica's PromptSource."""
    return PromptSource(recipe, tokenizer, load_source(recipe.data, tokenizer, announce), replica, num_replicas)
