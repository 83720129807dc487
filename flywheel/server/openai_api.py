"""OpenAI-compatible endpoints: /v1/models, /v1/completions and /v1/chat/completions (with SSE streaming).

With `stream=true` the engines report every step's progress: each choice's new text goes out as
it is generated, then its finish reason, then (when `stream_options.include_usage`) the usage, then
`[DONE]`. A client that disconnects has its requests aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flywheel.server.protocol import ChatMessage

logger = logging.getLogger(__name__)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _OpenAIFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extra sampling parameters, which OpenAI clients pass through `extra_body`.
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


def _sampling(body: _OpenAIFields, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, max_tokens=max_tokens, seed=body.seed,
                stop=stop, logprobs=logprobs, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                stop_token_ids=body.stop_token_ids)


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
        params = state.checked_sampling(_sampling(body, body.max_tokens or state.default_max_tokens, body.logprobs))
        prompts = body.prompt
        if isinstance(prompts, str):
            prompt_ids = [encode_text(state.tokenizer, prompts)]
        elif isinstance(prompts[0], int):
            prompt_ids = [prompts]
        elif isinstance(prompts[0], str):
            prompt_ids = [encode_text(state.tokenizer, text) for text in prompts]
        else:
            prompt_ids = prompts
        if body.max_tokens is None:
            params["max_tokens"] = state.fit_default_max_tokens(prompt_ids, params["max_tokens"])
        prompt_ids = state.check_prompt_ids(prompt_ids, "prompt", params["max_tokens"])
        if body.stream:
            return await stream_response(state, request, prompt_ids, params, body, chat=False)
        outputs = await state.generate(request, prompt_ids, params)
        choices = []
        for output in outputs:
            for completion in output["outputs"]:
                choice = {"index": len(choices), "text": completion["text"],
                          "finish_reason": completion["finish_reason"], "logprobs": None}
                if body.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(state.tokenizer, completion)
                choices.append(choice)
        return _envelope("cmpl", "text_completion", model, choices, outputs)

    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = check_model(body.model)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = state.checked_sampling(
            _sampling(body, body.max_completion_tokens or body.max_tokens or state.default_max_tokens, top))
        conversation = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt_ids = [encode_conversation(state.tokenizer, conversation, body.chat_template_kwargs)]
        except Exception as error:
            raise HTTPException(400, f"messages: the chat template failed: {error}") from error
        if body.max_completion_tokens is None and body.max_tokens is None:
            params["max_tokens"] = state.fit_default_max_tokens(prompt_ids, params["max_tokens"])
        max_tokens_field = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
        prompt_ids = state.check_prompt_ids(prompt_ids, "messages", params["max_tokens"], max_tokens_field)
        if body.stream:
            return await stream_response(state, request, prompt_ids, params, body, chat=True)
        outputs = await state.generate(request, prompt_ids, params)
        choices = []
        for completion in outputs[0]["outputs"]:
            choice = {"index": len(choices), "message": {"role": "assistant", "content": completion["text"]},
                      "finish_reason": completion["finish_reason"], "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(state.tokenizer, completion)}
            choices.append(choice)
        return _envelope("chatcmpl", "chat.completion", model, choices, outputs)

    for path, endpoint, method in (("/v1/models", models, "GET"), ("/v1/completions", completions, "POST"),
                                   ("/v1/chat/completions", chat_completions, "POST")):
        app.add_api_route(path, endpoint, methods=[method], dependencies=dependencies)


def _envelope(prefix: str, kind: str, model: str, choices: list[dict], outputs: list[dict]) -> dict[str, Any]:
    prompt_tokens = sum(len(output["prompt_token_ids"]) for output in outputs)
    completion_tokens = sum(len(c["token_ids"]) for output in outputs for c in output["outputs"])
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_response(state, request: Request, prompt_ids: list[list[int]], params: dict[str, Any],
                          body: _OpenAIFields, chat: bool) -> StreamingResponse:
    """Server-sent events as the engines step: per choice its new text, then its finish reason; then
    the usage if asked for, then `[DONE]`. Chat chunks carry a `delta`, completion chunks a `text`.

    The first progress is awaited before answering, so that a refused or timed-out request still
    gets its HTTP error status; later failures end the stream with an `error` event.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.options.request_timeout
    progress = state.pool.stream(prompt_ids, params)
    try:
        first_progress = await state.watch(request, anext(progress), state.options.request_timeout)
    except BaseException:
        await progress.aclose()
        raise
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": state.options.model}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    with_logprobs = params["logprobs"] is not None

    def content_choice(index: int, part: dict[str, Any], first: bool) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": part["text"]} if first else {"content": part["text"]}
            logprobs = {"content": _chat_logprobs(state.tokenizer, part)} if with_logprobs else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        logprobs = _completion_logprobs(state.tokenizer, part) if with_logprobs else None
        return {"index": index, "text": part["text"], "logprobs": logprobs, "finish_reason": None}

    def finish_choice(index: int, reason: str) -> dict[str, Any]:
        return {"index": index, **({"delta": {}} if chat else {"text": ""}), "logprobs": None, "finish_reason": reason}

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        started: set[int] = set()
        completion_tokens = 0
        async with aclosing(progress):
            try:
                item = first_progress
                while item is not None:
                    prompt_index, update = item
                    for part in update["outputs"]:
                        index = prompt_index * params["n"] + part["index"]
                        completion_tokens += len(part["token_ids"])
                        # A choice's first chunk goes out even when empty: it carries the chat role.
                        if part["text"] or index not in started or (with_logprobs and part["token_ids"]):
                            choice = content_choice(index, part, index not in started)
                            started.add(index)
                            yield event({**head, "choices": [choice]})
                        if part["finish_reason"] is not None:
                            yield event({**head, "choices": [finish_choice(index, part["finish_reason"])]})
                    item = await asyncio.wait_for(anext(progress, None), max(0.0, deadline - loop.time()))
            except TimeoutError:
                message = (f"generation took longer than {state.options.request_timeout:.0f}s (--request_timeout); "
                           "it was aborted")
                yield event({"error": {"message": message, "type": "timeout", "code": 504}})
                return
            except Exception as error:  # headers are out: the client learns of it from the stream
                logger.error("a streamed request failed: %s", error)
                yield event({"error": {"message": str(error), "type": type(error).__name__, "code": 500}})
                return
        if include_usage:
            usage = _usage(sum(len(ids) for ids in prompt_ids), completion_tokens)
            yield event({**head, "choices": [], "usage": usage})
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
