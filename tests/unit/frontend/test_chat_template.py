from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandem.frontend import chat_template
from tandem.frontend.chat_template import ChatTemplate, probe_conversations
from tandem.frontend.preprocess import ModelTokenizer
from tandem.models.tiny import write_tiny_model

CHATS = [
    *probe_conversations(),
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France? ça va"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Germany?", "name": "bob"},
    ],
]


def transformers_text(tokenizer: Any, conv: list[dict[str, str]]) -> str:
    return str(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))


def test_direct_render_is_exactly_transformers(hf_tokenizer: Any) -> None:
    render = ChatTemplate.for_tokenizer(hf_tokenizer)
    assert render.direct
    for conv in CHATS:
        assert render(conv) == transformers_text(hf_tokenizer, conv)


def test_direct_render_refuses_what_transformers_refuses(tmp_path: Path) -> None:
    """A template's own `raise_exception` surfaces from the direct render as from transformers'."""
    from transformers import AutoTokenizer

    model = write_tiny_model(tmp_path / "strict")
    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system messages') }}{% endif %}"
        "{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    render = ChatTemplate.for_tokenizer(tokenizer)
    assert render.direct
    conv = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    with pytest.raises(Exception, match="no system messages"):
        render(conv)
    with pytest.raises(Exception, match="no system messages"):
        transformers_text(tokenizer, conv)
    assert render(conv[1:]) == transformers_text(tokenizer, conv[1:])


def test_a_render_that_disagrees_falls_back_to_transformers(
    hf_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = chat_template._direct_render

    def off_by_a_space(tokenizer: Any) -> Any:
        direct = real(tokenizer)
        return lambda conv: direct(conv) + " "

    monkeypatch.setattr(chat_template, "_direct_render", off_by_a_space)
    render = ChatTemplate.for_tokenizer(hf_tokenizer)
    assert not render.direct
    for conv in CHATS:
        assert render(conv) == transformers_text(hf_tokenizer, conv)


def test_the_frontend_tokenizer_renders_directly(tiny_dir: Path) -> None:
    template = ModelTokenizer(tiny_dir)._template
    assert template is not None and template.direct
