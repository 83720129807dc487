"""OpenAI-compatible endpoints: /v1/models, /v1/completions and /v1/chat/completions (with SSE streaming).

Requests and responses follow OpenAI's API as vLLM serves it: a JSON null means the field's default,
errors come as `{"error": {"message", "type", "param", "code"}}` (a malformed request is a 400), and
`top_logprobs` are the k most likely tokens at each position.

With `stream=true` the engines report every step's progress: each choice's new text goes out as
it is generated, then its finish reason, then (when `stream_options.include_usage`) the usage, then
`[DONE]`. A client that disconnects has its requests aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import aclosing
from itertools import accumulate
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from flywheel.server.protocol import ChatMessage, Float, Int, TemplateKwargs, Text

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
# JSON has no infinities: a masked-out token's logprob goes out as vLLM's OpenAI server sends it.
MASKED_LOGPROB = -9999.0
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 504: "timeout_error"}
# This server's error messages start with the request field they are about: `max_tokens: 30 is too many ...`.
_NAMED_FIELD = re.compile(r"([A-Za-z_]\w*)[\w.\[\]]*: ")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _only_with(flag: str):
    """A field validator refusing its field unless the boolean field `flag` (declared before it) is true."""
    def check(cls, value: Any, info: ValidationInfo) -> Any:
        if not info.data.get(flag):
            raise ValueError(f"is only allowed with {flag}: true")
        return value
    return check


class _OpenAIFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = None
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] = Field(default_factory=dict)
    user: str | None = None
    # vLLM's extra sampling parameters, which OpenAI clients pass through `extra_body`.
    top_k: Int = Field(-1, ge=-1)
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Float = Field(1.0, gt=0.0)
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        # OpenAI's clients send `"temperature": null` and the like for "not given".
        return {name: value for name, value in data.items() if value is not None} if isinstance(data, dict) else data

    _stream_options_need_stream = field_validator("stream_options")(_only_with("stream"))

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float]) -> dict[str, float]:
        if value:
            raise ValueError("is not supported by this server; leave it empty or null")
        return value


class CompletionRequest(_OpenAIFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]] = Field(..., min_length=1)
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echoing the prompt is not supported by this server; leave it false")
        return value


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: TemplateKwargs = Field(default_factory=dict)

    _top_logprobs_need_logprobs = field_validator("top_logprobs")(_only_with("logprobs"))


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body for an HTTP status."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def named_field(message: str) -> str | None:
    """The request field an error message starts with (`messages[0]: ...` names `messages`); None for
    none, or for `body: ...` (the request as a whole)."""
    match = _NAMED_FIELD.match(message)
    return match.group(1) if match and match.group(1) != "body" else None


def validation_problems(error: RequestValidationError) -> list[str]:
    """Each problem of a request that does not fit the schema, once, as `field.path: what is wrong`."""
    problems = (f"{_field_path(problem['loc'])}: {problem['msg'].removeprefix('Value error, ')}"
                for problem in error.errors())
    return list(dict.fromkeys(problems))


def openai_validation_error(problems: list[str]) -> JSONResponse:
    """A request that does not fit the schema: 400 (as vLLM answers), naming each field that is wrong."""
    message = "; ".join(problems)
    return JSONResponse(status_code=400, content=openai_error(400, message, named_field(message)))


def _field_path(location: tuple) -> str:
    """`messages[0].content` for pydantic's ("body", "messages", 0, "content"), without the labels pydantic
    gives a union's members (`list[str]`); `body` for the body as a whole or a position in it."""
    if location and location[0] == "body":
        location = location[1:]
    if not location or not isinstance(location[0], str):
        return "body"
    parts = [part for part in location if isinstance(part, int) or part.isidentifier()]
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).removeprefix(".")


def _sampling(body: _OpenAIFields, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, max_tokens=max_tokens, seed=body.seed,
                stop=stop, logprobs=logprobs, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                stop_token_ids=body.stop_token_ids)


def add_openai_routes(app: FastAPI, state, dependencies: list) -> None:
    served = state.options.model
    model_card = {"id": served, "object": "model", "created": 0, "owned_by": "flywheel"}

    def check_model(name: str | None) -> str:
        if name not in (None, served, served.rstrip("/").rsplit("/", 1)[-1]):
            raise HTTPException(404, f"model: {name!r} is not served here; this server serves {served!r}")
        return served

    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    async def model_by_id(model_id: str) -> dict:
        check_model(model_id)
        return model_card

    async def completions(body: CompletionRequest, request: Request):
        model = check_model(body.model)
        params = state.checked_sampling(_sampling(body, body.max_tokens or state.default_max_tokens, body.logprobs))
        prompts = body.prompt
        if isinstance(prompts, str):
            prompt_ids = await state.encode_texts([prompts])
        elif isinstance(prompts[0], int):
            prompt_ids = [prompts]
        elif isinstance(prompts[0], str):
            prompt_ids = await state.encode_texts(prompts)
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
                    choice["logprobs"] = _completion_logprobs(state.tokenizer, completion)[0]
                choices.append(choice)
        return _envelope("cmpl", "text_completion", model, choices, outputs)

    async def chat_completions(body: ChatCompletionRequest, request: Request):
        model = check_model(body.model)
        top = (body.top_logprobs or 0) if body.logprobs else None
        # Left out, max_tokens is what the context has room for, as OpenAI's and vLLM's chat endpoints do.
        default_max_tokens = state.options.max_tokens_limit
        params = state.checked_sampling(
            _sampling(body, body.max_completion_tokens or body.max_tokens or default_max_tokens, top))
        conversation = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = await state.encode_conversations([conversation], body.chat_template_kwargs)
        if body.max_completion_tokens is None and body.max_tokens is None:
            params["max_tokens"] = state.fit_default_max_tokens(prompt_ids, default_max_tokens)
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
                choice["logprobs"] = {"content": _chat_logprobs(state.tokenizer, completion, top)}
            choices.append(choice)
        return _envelope("chatcmpl", "chat.completion", model, choices, outputs)

    for path, endpoint, method in (("/v1/models", models, "GET"), ("/v1/models/{model_id:path}", model_by_id, "GET"),
                                   ("/v1/completions", completions, "POST"),
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
    text_offsets: dict[int, int] = {}  # per choice, where its next token starts in its text

    def content_choice(index: int, part: dict[str, Any], first: bool) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": part["text"]} if first else {"content": part["text"]}
            logprobs = {"content": _chat_logprobs(state.tokenizer, part, params["logprobs"])} if with_logprobs else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        logprobs = None
        if with_logprobs:
            logprobs, text_offsets[index] = _completion_logprobs(state.tokenizer, part, text_offsets.get(index, 0))
        return {"index": index, "text": part["text"], "logprobs": logprobs, "finish_reason": None}

    def finish_choice(index: int, reason: str) -> dict[str, Any]:
        return {"index": index, **({"delta": {}} if chat else {"text": ""}), "logprobs": None, "finish_reason": reason}

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, allow_nan=False)}\n\n"

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
                yield event(openai_error(504, message))
                return
            except Exception as error:  # headers are out: the client learns of it from the stream
                logger.error("a streamed request failed: %s", error)
                yield event(openai_error(500, f"{type(error).__name__}: {error}"))
                return
        if include_usage:
            usage = _usage(sum(len(ids) for ids in prompt_ids), completion_tokens)
            yield event({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def finite_logprobs(rows: list[list[float]]) -> list[list[float]]:
    """Logprob rows as strict JSON can carry them: -inf (a token masked out, by min_tokens for one) and
    NaN become `MASKED_LOGPROB`; finite values stay as they are."""
    if math.isfinite(sum(map(sum, rows))):  # the usual case, checked without a Python loop over the values
        return rows
    return [[value if math.isfinite(value) else MASKED_LOGPROB for value in row] for row in rows]


def _logprob_rows(completion: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
    """Per token, its logprob row's token ids and logprobs (the sampled token first), JSON-safe."""
    return list(zip(completion["logprob_token_ids"] or [], finite_logprobs(completion["logprobs"] or [])))


def _completion_logprobs(tokenizer, completion: dict[str, Any], text_offset: int = 0) -> tuple[dict[str, Any], int]:
    """The legacy `logprobs` object, whose `top_logprobs` hold the top-k and the sampled token (up to k + 1,
    as OpenAI's), and the text offset after its last token."""
    tokens = [tokenizer.decode([t]) for t in completion["token_ids"]]
    offsets = list(accumulate(map(len, tokens), initial=text_offset))
    rows = _logprob_rows(completion)
    top_logprobs = []
    for ids, values in rows:
        alternatives: dict[str, float] = {}
        for token_id, logprob in _most_likely_first(ids, values):
            alternatives.setdefault(tokenizer.decode([token_id]), logprob)  # tokens that decode alike: the likeliest
        top_logprobs.append(alternatives)
    logprobs = {"tokens": tokens, "token_logprobs": [values[0] for _, values in rows],
                "top_logprobs": top_logprobs, "text_offset": offsets[:-1]}
    return logprobs, offsets[-1]


def _chat_logprobs(tokenizer, completion: dict[str, Any], num_top: int) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: per token, its logprob and the `num_top` most likely tokens there."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for ids, values in _logprob_rows(completion):
        top = [entry(*pair) for pair in _most_likely_first(ids, values)[:num_top]]
        content.append({**entry(ids[0], values[0]), "top_logprobs": top})
    return content


def _most_likely_first(ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    """A logprob row's (token id, logprob) pairs by logprob. The engine sends the sampled token first and
    then the top-k without it, so the first k pairs are the top-k whether or not it is among them."""
    return sorted(zip(ids, values), key=lambda pair: -pair[1])
