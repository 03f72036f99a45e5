"""One row -> prompt text and token ids (prompt column, template, chat messages or token ids), and truncation.

Truncation shortens only the *body* of the prompt (the prompt column, the template's truncate_field, or the
last user message), so the template's instructions and the chat template's generation prompt survive.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from seesaw_ds.jobs.recipe import DataSection
from seesaw_ds.jobs.schema import RecipeError

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class RowProblem(Exception):
    """A row that cannot become a prompt; `kind` is "empty", "non_text", "bad_id" or "max_tokens"."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


MIN_UNTOKENIZED_CHARS = 1 << 16    # prompts shorter than this are always tokenized (an exact count is cheap)


class TooLong(Exception):
    """A prompt with more characters than its token limit allows, found before tokenizing it."""

    def __init__(self, chars: int, max_chars: int):
        super().__init__(f"prompt of {chars} characters")
        self.chars, self.max_chars = chars, max_chars


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Parts:
    body: str | None                 # the part truncation may shorten (None: nothing may be shortened)
    compose: Callable[[str], str]    # body -> full prompt text
    special_tokens: bool             # add the tokenizer's special tokens (False once a chat template rendered)


class PromptRenderer:
    def __init__(self, data: DataSection, tokenizer):
        self.data, self.tokenizer = data, tokenizer
        needs_chat = data.columns.messages is not None or data.chat_template
        if tokenizer is None and data.columns.prompt_token_ids is None:
            raise RecipeError("data.columns", "text prompts need a tokenizer")
        if needs_chat and not getattr(tokenizer, "chat_template", None):
            key = "data.columns.messages" if data.columns.messages is not None else "data.chat_template"
            raise RecipeError(key, "needs a tokenizer with a chat template; this tokenizer has none")
        fields = data.template_fields()
        self.body_field = data.truncate_field or (fields[0] if len(fields) == 1 else None)
        self.chars_per_token = _longest_token_chars(tokenizer)

    def max_chars(self, limit: int) -> int:
        """Characters above which a prompt surely has more than `limit` tokens (no token covers more than
        `chars_per_token` characters), so it need not be tokenized to be found too long."""
        return max(4 * max(limit, 1) * self.chars_per_token, MIN_UNTOKENIZED_CHARS)

    # ---- rendering ----------------------------------------------------------------------------------------
    def _chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _wrap(self, text: str) -> str:
        return self._chat([{"role": "user", "content": text}]) if self.data.chat_template else text

    def _encode(self, text: str, special: bool) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def _text(value: Any, column: str, numbers_ok: bool = False) -> str:
        if value is None:
            raise RowProblem("empty", f"column {column!r} is empty")
        if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise RowProblem("non_text", f"column {column!r} holds a {type(value).__name__}, not text")
        if not value.strip():
            raise RowProblem("empty", f"column {column!r} is empty")
        return value

    def _messages(self, value: Any, column: str) -> list[dict[str, str]]:
        if not isinstance(value, (list, tuple)) or not value:
            raise RowProblem("empty" if value is None or value == [] else "non_text",
                             f"column {column!r} holds {type(value).__name__}, not a list of messages")
        messages = []
        for turn, message in enumerate(value):
            if not isinstance(message, dict):
                raise RowProblem("non_text", f"column {column!r} message {turn} is not a mapping")
            role = message.get("role") or message.get("from")       # OpenAI style, or ShareGPT style
            content = message.get("content") if message.get("content") is not None else message.get("value")
            if role not in _ROLE_ALIASES:
                raise RowProblem("non_text", f"column {column!r} message {turn} has an unknown role {role!r}")
            messages.append({"role": _ROLE_ALIASES[role],
                             "content": self._text(content, f"{column}[{turn}].content")})
        return messages

    def _parts(self, row: dict) -> _Parts:
        data, columns = self.data, self.data.columns
        special = not (data.chat_template or columns.messages is not None)
        if columns.messages is not None:
            messages = self._messages(row[columns.messages], columns.messages)
            last = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
                m["role"] == "user" for m in messages) else len(messages) - 1

            def compose(body: str) -> str:
                return self._chat(messages[:last] + [{**messages[last], "content": body}] + messages[last + 1:])
            return _Parts(messages[last]["content"], compose, special)
        if columns.prompt is not None:
            return _Parts(self._text(row[columns.prompt], columns.prompt), self._wrap, special)
        values = {name: self._text(row[name], name, numbers_ok=True) for name in data.template_fields()}
        body_field = self.body_field
        return _Parts(values[body_field] if body_field else None,
                      lambda body: self._wrap(data.template.format_map({**values, body_field: body}
                                                                       if body_field else values)), special)

    def _token_ids(self, row: dict) -> RenderedPrompt:
        column = self.data.columns.prompt_token_ids
        value = row[column]
        if value is None or (isinstance(value, (list, tuple)) and not value):
            raise RowProblem("empty", f"column {column!r} is empty")
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
            raise RowProblem("non_text", f"column {column!r} does not hold a list of token ids")
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        if vocab is not None and max(value) >= vocab:
            raise RowProblem("non_text", f"column {column!r} holds token id {max(value)} >= vocabulary {vocab}")
        return RenderedPrompt(self._decode(value), tuple(value))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def render(self, row: dict, max_chars: int | None = None) -> RenderedPrompt:
        """Raise RowProblem for an empty or non-text prompt, TooLong for text over `max_chars` characters (a
        huge row is never tokenized whole)."""
        if self.data.columns.prompt_token_ids is not None:
            return self._token_ids(row)
        parts = self._parts(row)
        if max_chars is not None and parts.body is not None and len(parts.body) > max_chars:
            raise TooLong(len(parts.body), max_chars)
        text = parts.compose(parts.body) if parts.body is not None else parts.compose("")
        if max_chars is not None and len(text) > max_chars:
            raise TooLong(len(text), max_chars)
        return RenderedPrompt(text, self._encode(text, parts.special_tokens))

    # ---- truncation ------------------------------------------------------------------------------------------
    def truncate(self, row: dict, prompt: RenderedPrompt | None, limit: int) -> RenderedPrompt | None:
        """A prompt of at most `limit` tokens with the body shortened, or None when that cannot be done.
        A body far longer than `limit` tokens is first cut by characters, so it is never tokenized whole."""
        if self.data.columns.prompt_token_ids is not None:
            return RenderedPrompt(self._decode(prompt.token_ids[:limit]), prompt.token_ids[:limit])
        parts = self._parts(row)
        if parts.body is None:
            return None
        budget = limit - len(self._encode(parts.compose(""), parts.special_tokens))
        body_ids = self._encode(parts.body[:self.max_chars(limit)], False)
        for _ in range(4):  # decode/re-encode can merge tokens at the cut: shrink until it fits
            if budget < 1:
                return None
            text = parts.compose(self.tokenizer.decode(list(body_ids[:budget])))
            ids = self._encode(text, parts.special_tokens)
            if len(ids) <= limit:
                return RenderedPrompt(text, ids)
            budget -= len(ids) - limit
        return None


def _longest_token_chars(tokenizer) -> int:
    """The most characters one ordinary token of `tokenizer` spells (1 when it cannot say)."""
    try:
        special = set(getattr(tokenizer, "all_special_tokens", None) or ())
        return max(1, max((len(t) for t in tokenizer.get_vocab() if t not in special), default=1))
    except (AttributeError, TypeError, NotImplementedError):
        return 1
