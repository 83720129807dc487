"""The wire format: pydantic request and response models of the TRL-style endpoints.

Field constraints here give a 422 naming the field; checks that need the served model (vocabulary,
lengths, parameter names) happen in app.py and give a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.weight_sync import DEFAULT_BUCKET_BYTES, DTYPES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """Sampling controls shared by /generate and /chat (the names of vLLM's SamplingParams)."""

    n: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(
        0, ge=0, le=20, description="Top-k logprobs per token besides the sampled one's; null: none at all."
    )
    seed: int | None = Field(None, description="Per-request seed (reproducible sampling).")
    stop: list[str] | None = Field(None, description="Stop strings (not included in the output).")
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Any other SamplingParams field, e.g. min_tokens, ignore_eos."
    )
    truncate_prompt_tokens: int | None = Field(
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
    prompts: list[str] | list[list[int]] = Field(
        ..., min_length=1, description="Prompts as text, or as token-id lists."
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(..., min_length=1)
    content: str | list[Any] | None = None


class ChatRequest(SamplingFields):
    messages: list[list[ChatMessage]] = Field(..., min_length=1, description="Conversations, one per prompt.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)

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
    port: int = Field(..., ge=1, le=65535)
    world_size: int = Field(..., ge=2, description="tensor_parallel_size x data_parallel_size + 1.")
    backend: str | None = Field(None, description="'nccl' or 'gloo'; default: NCCL on GPU servers, Gloo on CPU.")
    client_device_uuid: str | None = Field(None, description="The client's GPU UUID, to refuse a shared GPU.")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value not in (None, "nccl", "gloo"):
            raise ValueError(f"must be 'nccl' or 'gloo', got {value!r}")
        return value


class ParamMeta(_Strict):
    name: str = Field(..., min_length=1)
    dtype: str = Field(..., description=f"One of {sorted(DTYPES)}.")
    shape: list[int] = Field(..., description="Full (unsharded) shape.")

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
    bucket_bytes: int = Field(DEFAULT_BUCKET_BYTES, ge=1, le=4 * 2**30, description="Flat bucket size.")


class WorldSizeResponse(BaseModel):
    world_size: int
