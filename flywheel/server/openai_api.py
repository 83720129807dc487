"""OpenAI-compatible endpoints: /v1/models, /v1/completions and /v1/chat/completions (with SSE streaming).

The engine reports a request when it finishes, so a stream carries each choice's whole text in one
chunk, then the finish reason, then `[DONE]`: clients written for streaming work unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flywheel.server.protocol import ChatMessage


class _OpenAIFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extra sampling parameters, which OpenAI clients pass through `extra_body`.
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


def _sampling(body: _OpenAIFields, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, max_tokens=max_tokens or 16, seed=body.seed,
                stop=stop, logprobs=logprobs)


def add_openai_routes(app: FastAPI, state, dependencies: list) -> None:
    from flywheel.server.app import encode_conversation, encode_text

    served = state.options.model

    def check_model(name: str | None) -> str:
        if name not in (None, served, served.rstrip("/").rsplit("/", 1)[-1]):
            raise HTTPException(404, f"model: {name!r} is not served here; this server serves {served!r}")
        return served

    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": served, "object": "model", "created": 0, "owned_by": "flywheel"}]}

    async def completions(body: CompletionRequest, request: Request):
        model = check_model(body.model)
        params = state.checked_sampling(_sampling(body, body.max_tokens, body.logprobs))
        prompts = body.prompt
        if isinstance(prompts, str):
            prompt_ids = [encode_text(state.tokenizer, prompts)]
        elif isinstance(prompts[0], int):
            prompt_ids = [prompts]
        elif isinstance(prompts[0], str):
            prompt_ids = [encode_text(state.tokenizer, text) for text in prompts]
        else:
            prompt_ids = prompts
        prompt_ids = state.check_prompt_ids(prompt_ids, "prompt")
        outputs = await state.generate(request, prompt_ids, params)
        choices = []
        for output in outputs:
            for completion in output["outputs"]:
                choice = {"index": len(choices), "text": completion["text"],
                          "finish_reason": completion["finish_reason"], "logprobs": None}
                if body.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(state.tokenizer, completion)
                choices.append(choice)
        response = _envelope("cmpl", "text_completion", model, choices, outputs)
        if body.stream:
            return _stream(response, "text_completion", lambda c: {"text": c["text"]})
        return response

    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = check_model(body.model)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = state.checked_sampling(_sampling(body, body.max_completion_tokens or body.max_tokens, top))
        conversation = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt_ids = [encode_conversation(state.tokenizer, conversation, body.chat_template_kwargs)]
        except Exception as error:
            raise HTTPException(400, f"messages: the chat template failed: {error}") from error
        prompt_ids = state.check_prompt_ids(prompt_ids, "messages")
        outputs = await state.generate(request, prompt_ids, params)
        choices = []
        for completion in outputs[0]["outputs"]:
            choice = {"index": len(choices), "message": {"role": "assistant", "content": completion["text"]},
                      "finish_reason": completion["finish_reason"], "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(state.tokenizer, completion)}
            choices.append(choice)
        response = _envelope("chatcmpl", "chat.completion", model, choices, outputs)
        if body.stream:
            return _stream(response, "chat.completion.chunk",
                           lambda c: {"delta": {"role": "assistant", "content": c["message"]["content"]}})
        return response

    for path, endpoint, method in (("/v1/models", models, "GET"), ("/v1/completions", completions, "POST"),
                                   ("/v1/chat/completions", chat_completions, "POST")):
        app.add_api_route(path, endpoint, methods=[method], dependencies=dependencies)


def _envelope(prefix: str, kind: str, model: str, choices: list[dict], outputs: list[dict]) -> dict[str, Any]:
    prompt_tokens = sum(len(output["prompt_token_ids"]) for output in outputs)
    completion_tokens = sum(len(c["token_ids"]) for output in outputs for c in output["outputs"])
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _stream(response: dict[str, Any], chunk_kind: str, content_of) -> StreamingResponse:
    """Server-sent events: per choice a content chunk, then a finish chunk; then usage and [DONE]."""

    async def events() -> AsyncIterator[str]:
        head = {"id": response["id"], "object": chunk_kind, "created": response["created"],
                "model": response["model"]}
        for choice in response["choices"]:
            content = {"index": choice["index"], **content_of(choice), "logprobs": choice["logprobs"],
                       "finish_reason": None}
            yield f"data: {json.dumps({**head, 'choices': [content]})}\n\n"
            done = {"index": choice["index"], "finish_reason": choice["finish_reason"]}
            done.update({"delta": {}} if "delta" in content else {"text": ""})
            yield f"data: {json.dumps({**head, 'choices': [done]})}\n\n"
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': response['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _completion_logprobs(tokenizer, completion: dict[str, Any]) -> dict[str, Any]:
    tokens = [tokenizer.decode([t]) for t in completion["token_ids"]]
    rows = zip(completion["logprobs"] or [], completion["logprob_token_ids"] or [])
    return {"tokens": tokens,
            "token_logprobs": [values[0] for values in completion["logprobs"] or []],
            "top_logprobs": [{tokenizer.decode([t]): v for t, v in zip(ids[1:], values[1:])} for values, ids in rows]}


def _chat_logprobs(tokenizer, completion: dict[str, Any]) -> list[dict[str, Any]]:
    content = []
    for values, ids in zip(completion["logprobs"] or [], completion["logprob_token_ids"] or []):
        content.append({"token": tokenizer.decode([ids[0]]), "logprob": values[0],
                        "top_logprobs": [{"token": tokenizer.decode([t]), "logprob": v}
                                         for t, v in zip(ids[1:], values[1:])]})
    return content
