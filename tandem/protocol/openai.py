"""OpenAI HTTP schemas: what the frontend accepts and returns. Boundary only.

Requests are decoded with msgspec (one pass, type errors name the field); nothing behind the frontend
sees these types. Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send
`user`, `metadata` or vendor extensions still work; fields that would change the answer's shape
(`response_format`, `tools`) are decoded so that what Tandem cannot honour is refused, not ignored.
The streaming path does not build these structs: it writes prebuilt byte templates
(`tandem.frontend.sse`); the response structs here serve the non-streaming path and the OpenAPI
document.
"""

from __future__ import annotations

from typing import Any

import msgspec


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    """A string, or OpenAI content parts (only `{"type": "text"}` parts are understood)."""
    name: str | None = None


class NvExt(msgspec.Struct, omit_defaults=True):
    """Extension (NVIDIA Dynamo's `nvext`): only `extra_fields: ["timing"]` is understood; other
    members and values are ignored (`tandem.frontend.timing`)."""

    extra_fields: list[str] | None = None


class _SamplingFields(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Fields common to both endpoints. Extensions beyond OpenAI are marked."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """Extension (vLLM): keep the k most likely tokens; 0 or -1 keeps all."""
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    """Extension: stop after any of these token ids (the token itself is generated)."""
    ignore_eos: bool = False
    """Extension: generate past end-of-sequence tokens (benchmarks with fixed output lengths)."""
    min_tokens: int = 0
    """Extension: do not stop (EOS, stop ids, stop strings) before this many tokens."""
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    nvext: NvExt | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    """Only `{"type": "text"}`: JSON modes need guided decoding, which Tandem does not do (400)."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    """Tools are accepted only with tool_choice "none": without a tool-call parser a model's call
    would come back as plain text, so any other choice is a 400 rather than silently no calls."""
    functions: list[dict[str, Any]] | None = None
    """The deprecated form of `tools`; refused the same way."""


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]
    """A string, a list of token ids, or a one-element list of either."""
    logprobs: int | None = None
    echo: bool = False


class ModelObject(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "tandem"
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelObject]
    object: str = "list"


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]]


class ChatChoiceLogprobs(msgspec.Struct):
    content: list[ChatLogprob]


class ResponseMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    nvext: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """Only when the request asked for it (`tandem.frontend.timing`)."""


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: str = "text_completion"
    nvext: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    """Only when the request asked for it (`tandem.frontend.timing`)."""


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


SCHEMAS: tuple[type, ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
    ErrorResponse,
)
"""Types published in /openapi.json's components."""
