"""Offline API: generate completions for a list of prompts in this process.

    llm = LLM("path/to/checkpoint")
    [c.text for c in llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))]

This is what a worker wraps, minus the request plane. Prompts are raw completion prompts: tokenized
with the tokenizer's own special-token rule, no chat template (use `chat()` for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import SamplingParams
from tandem.engines.factory import build_executor
from tandem.protocol.errors import CheckpointError


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's own tokenizer, from local files only."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise CheckpointError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class LLM:
    def __init__(
        self,
        model: str | Path,
        *,
        engine: str = "builtin",
        dtype: str = "bfloat16",
        device: str = "cpu",
        config: EngineConfig | None = None,
        speedup: float = 1.0,
    ) -> None:
        self.model_dir = Path(model)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model folder {self.model_dir} does not exist")
        self.config = config or EngineConfig()
        self.tokenizer = load_tokenizer(self.model_dir)
        executor = build_executor(
            engine, self.model_dir, self.config, dtype=dtype, device=device, speedup=speedup
        )
        self.core = EngineCore(self.config, executor)

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def chat(self, messages: list[dict[str, str]], sampling: SamplingParams | None = None) -> Completion:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return self.generate([list(ids)], sampling)[0]

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run every prompt as one continuously batched workload; results in prompt order."""
        params = sampling if isinstance(sampling, Sequence) else [sampling or SamplingParams()] * len(prompts)
        assert len(params) == len(prompts), "one SamplingParams per prompt"
        results: dict[str, Completion] = {}
        order = []
        for prompt, sp in zip(prompts, params, strict=True):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            req = self.core.add_request(ids, sp)
            results[req.request_id] = Completion(prompt_token_ids=ids, logprobs=[] if sp.logprobs else None)
            order.append(req.request_id)
        while self.core.has_unfinished():
            for out in self.core.step():
                c = results.get(out.request_id)
                if c is None:
                    continue
                c.token_ids.extend(out.new_token_ids)
                if out.new_logprobs and c.logprobs is not None:
                    c.logprobs.extend(out.new_logprobs)
                if out.finish_reason is not None:
                    c.finish_reason = out.finish_reason
                    c.num_cached_tokens = out.num_cached_tokens
        for c in results.values():
            c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        return [results[rid] for rid in order]
