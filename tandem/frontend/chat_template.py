"""ChatTemplate: a tokenizer's chat template, rendered as transformers renders it, minus its per-call layers.

    render = ChatTemplate.for_tokenizer(tokenizer)
    text = render([{"role": "user", "content": "Hi"}])
    # == tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)

Why: `apply_chat_template` spends more time around the template than in it. Each call picks the
template again, walks the messages three times (objects to dicts, dropping None values, rebuilding
them out of plain JSON types against sandbox escapes), rebuilds `special_tokens_map` from the
tokenizer's attributes, and checks options this frontend never sets. A one-message chat of the
serving benchmark's took 96 us that way and 28 us here, on the event loop of every chat request
(docs/benchmarks.md, session 24). The messages the
frontend builds (`preprocess._message_dict`) are already plain: str values only, no None, no
reasoning fields, so those walks change nothing. What is left is the one Jinja render, with the
template transformers compiles (its own sandboxed environment and helpers) and the special tokens
fixed at load.

Exactness is checked, not assumed: `for_tokenizer` renders probe conversations both ways (roles,
turns, names, whitespace, accents, emoji, CJK, and a chat the template may refuse) and keeps the
direct path only if every text, and every refusal, agrees; otherwise, or when this transformers has
no `_compile_jinja_template` (a private helper), each call goes through `apply_chat_template`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]

PROBE_TEXTS = (
    "Hello, world! 123 and 4567.",
    " leading space, trailing space ",
    "Line one\nline two\n\n  indented\ttab",
    "naïve café — “quotes” 😀🎉 日本語のテキスト",
    "e\u0301 (combining accent) and \u00e9 (precomposed)",
    "don't can't we'll I'm you're",
    "{{ not a template }} {% neither %}",
)
"""Message texts the probes use (also the chat piece cache's, `tandem.frontend.chat_tokens`)."""


class ChatTemplate:
    """Callable: conversation (plain dicts of str) -> the rendered prompt text, generation prompt added."""

    def __init__(self, render: Callable[[Conversation], str], direct: bool) -> None:
        self._render = render
        self.direct = direct
        """True when the compiled template renders without `apply_chat_template` around it."""

    def __call__(self, conv: Conversation) -> str:
        return self._render(conv)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        def through_transformers(conv: Conversation) -> str:
            return str(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))

        slow = cls(through_transformers, direct=False)
        direct = _direct_render(tokenizer)
        if direct is None:
            return slow
        for chat in probe_conversations():
            if _outcome(direct, chat) != _outcome(through_transformers, chat):
                log.info("chat template: direct render differs from transformers; using apply_chat_template")
                return slow
        return cls(direct, direct=True)


def _direct_render(tokenizer: Any) -> Callable[[Conversation], str] | None:
    """The compiled template with its globals and the special tokens bound once, as
    `render_jinja_template` calls it. Jinja's `Template.render` would merge the template's globals
    (a ChainMap) into a new dict on every call; `new_context(shared=True)` takes ours as is."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
        special = {k: _plain(v) for k, v in tokenizer.special_tokens_map.items()}
        base = {**compiled.globals, **special, "tools": None, "documents": None}
        base["add_generation_prompt"] = True
        new_context, render = compiled.new_context, compiled.root_render_func
        concat = compiled.environment.concat
    except Exception as e:  # no template, or a transformers / Jinja without these helpers
        log.info("chat template: no direct render (%s); using apply_chat_template", e)
        return None

    def direct(conv: Conversation) -> str:
        return str(concat(render(new_context({**base, "messages": conv}, shared=True))))

    return direct


def _plain(value: Any) -> Any:
    """Special-token values as plain str / list (transformers hands the template plain types)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _outcome(render: Callable[[Conversation], str], conv: Conversation) -> tuple[bool, str]:
    """(rendered, text) or (refused, the error's type): a probe compares both ways of failing too."""
    try:
        return True, render([dict(m) for m in conv])
    except Exception as e:
        return False, type(e).__name__


def probe_conversations() -> list[Conversation]:
    """Chats with several roles and turns, a named message, text that starts without a space,
    whitespace runs, accents, emoji, CJK, template syntax as text, and an empty message."""
    t = PROBE_TEXTS
    return [
        [{"role": "user", "content": t[0]}],
        [{"role": "system", "content": t[1]}, {"role": "user", "content": t[2]}],
        [
            {"role": "user", "content": t[3]},
            {"role": "assistant", "content": t[4]},
            {"role": "user", "content": t[5]},
        ],
        [{"role": "user", "content": t[6], "name": "alice"}, {"role": "assistant", "content": ""}],
        [{"role": "assistant", "content": t[2]}, {"role": "assistant", "content": t[3]}],
    ]
