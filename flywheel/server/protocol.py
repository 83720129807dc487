"""The wire format: pydantic request and response models of the TRL-style endpoints.

Field constraints here give a 422 naming the field; checks that need the served model (vocabulary,
lengths, parameter names) happen in app.py and give a 400 naming the field.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from flywheel.weight_sync import DEFAULT_BUCKET_BYTES, DTYPES

# apply_chat_template's own arguments, which the server sets; a request's `chat_template` would be code
# the server runs (a template's loops can stall it).
SERVER_TEMPLATE_ARGUMENTS = ("chat_template", "conversation", "messages", "tokenize")


def not_a_boolean(value: Any) -> Any:
    """Refuse JSON true/false where a number belongs (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _valid_unicode(text: str) -> str:
    """Refuse a lone surrogate (JSON can escape one, "\\ud800"): no tokenizer can encode it."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(f"{text[error.start:error.end]!r} at character {error.start} is a lone surrogate, "
                         "not Unicode text") from None
    return text


def _template_variables(kwargs: dict[str, Any]) -> dict[str, Any]:
    taken = [name for name in SERVER_TEMPLATE_ARGUMENTS if name in kwargs]
    if taken:
        raise ValueError(f"{taken[0]!r} is set by the server (it renders the model's own chat template); "
                         "pass only the template's variables, e.g. enable_thinking")
    return kwargs


Int = Annotated[int, BeforeValidator(not_a_boolean)]
Float = Annotated[float, BeforeValidator(not_a_boolean)]
Text = Annotated[str, AfterValidator(_valid_unicode)]
TemplateKwargs = Annotated[dict[str, Any], AfterValidator(_template_variables)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """Sampling controls shared by /generate and /chat (the names of vLLM's SamplingParams)."""

    n: Int = Field(1, ge=1, description="Completions per prompt.")
    temperature: Float = Field(1.0, ge=0.0, description="0 is greedy.")
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(-1, ge=-1, description="-1 or 0: off.")
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Float = Field(1.0, gt=0.0)
    max_tokens: Int = Field(16, ge=1)
    logprobs: Int | None = Field(
        0, ge=0, le=20, description="Top-k logprobs per token besides the sampled one's; null: none at all."
    )
    seed: Int | None = Field(None, description="Per-request seed (reproducible sampling).")
    stop: list[Text] | None = Field(None, description="Stop strings (not included in the output).")
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Any other SamplingParams field, e.g. min_tokens, ignore_eos."
    )
    truncate_prompt_tokens: Int | None = Field(
        None, ge=-1, description="Keep only the last k prompt tokens; -1: as many as the model takes."
    )
    # Sent by TRL's clients (older and newer names); accepted so that they work unchanged, refused when set.
    guided_decoding_regex: str | None = Field(None, description="Not supported; must be null.")
    structured_outputs_regex: str | None = Field(None, description="Not supported; must be null.")
    images: list[Any] | None = Field(None, description="Not supported; must be null.")

    @field_validator("guided_decoding_regex", "structured_outputs_regex", "images")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported by this server; leave it null")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be a number of tokens >= 1, -1 (as many as the model takes) or null")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(value):
            raise ValueError("stop strings must be non-empty")
        return value


class GenerateRequest(SamplingFields):
    prompts: list[Text] | list[list[Int]] = Field(
        ..., min_length=1, description="Prompts as text, or as token-id lists."
    )


class ChatMessage(BaseModel):
    """A chat message; a content given as text parts ([{"type": "text", "text": ...}]) is joined by
    newlines, as vLLM does."""

    model_config = ConfigDict(extra="allow")
    role: Text = Field(..., min_length=1)
    content: Text | list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _joined_text_parts(cls, content: str | list[Any] | None) -> str | None:
        if not isinstance(content, list):
            return content
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {index} is of type {kind!r}; only text parts "
                                 "({'type': 'text', 'text': ...}) are supported")
        return _valid_unicode("\n".join(part["text"] for part in content))


class ChatRequest(SamplingFields):
    messages: list[list[ChatMessage]] = Field(..., min_length=1, description="Conversations, one per prompt.")
    chat_template_kwargs: TemplateKwargs = Field(
        default_factory=dict, description="Variables of the model's chat template, e.g. enable_thinking."
    )

    @field_validator("messages")
    @classmethod
    def _non_empty_conversations(cls, value: list[list[ChatMessage]]) -> list[list[ChatMessage]]:
        for index, conversation in enumerate(value):
            if not conversation:
                raise ValueError(f"conversation {index} is empty")
        return value


class GenerateResponse(BaseModel):
    prompt_ids: list[list[int]] = Field(description="Token ids of each prompt.")
    completion_ids: list[list[int]] = Field(description="len(prompts) * n completions, grouped by prompt.")
    logprobs: list[list[list[float]]] | None = Field(
        description="[completion][token][k]: the sampled token's logprob first, then the top-k."
    )
    logprob_token_ids: list[list[list[int]]] | None = Field(description="Token ids of `logprobs`, same shape.")
    finish_reasons: list[str | None] = Field(description="'stop' or 'length', one per completion.")


class InitCommunicatorRequest(_Strict):
    host: str = Field(..., min_length=1, description="Address server rank 0 binds the rendezvous to.")
    port: Int = Field(..., ge=1, le=65535)
    world_size: Int = Field(..., ge=2, description="tensor_parallel_size x data_parallel_size + 1.")
    backend: str | None = Field(None, description="'nccl' or 'gloo'; default: NCCL on GPU servers, Gloo on CPU.")
    client_device_uuid: str | None = Field(None, description="The client's GPU UUID, to refuse a shared GPU.")

    @field_validator("host")
    @classmethod
    def _host_alone(cls, value: str) -> str:
        if "://" in value or any(c.isspace() for c in value) or (":" in value and not _is_ipv6(value)):
            raise ValueError(f"must be a host name or IP address, without scheme or port, got {value!r}")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value not in (None, "nccl", "gloo"):
            raise ValueError(f"must be 'nccl' or 'gloo', got {value!r}")
        return value


class ParamMeta(_Strict):
    name: str = Field(..., min_length=1)
    dtype: str = Field(..., description=f"One of {sorted(DTYPES)}.")
    shape: list[Int] = Field(..., description="Full (unsharded) shape.")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        value = value.removeprefix("torch.")
        if value not in DTYPES:
            raise ValueError(f"must be one of {sorted(DTYPES)}, got {value!r}")
        return value

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(size < 0 for size in value):
            raise ValueError(f"sizes must be >= 0, got {value}")
        return value


class UpdateNamedParamRequest(ParamMeta):
    pass


class BatchUpdateRequest(_Strict):
    params: list[ParamMeta] = Field(..., min_length=1)
    bucket_bytes: Int = Field(DEFAULT_BUCKET_BYTES, ge=1, le=4 * 2**30, description="Flat bucket size.")


class WorldSizeResponse(BaseModel):
    world_size: int


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
