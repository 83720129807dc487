"""The FastAPI application: TRL-style generation and weight-sync endpoints over a WorkerPool."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, get_type_hints

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.engine.sampling import FLOAT32_MAX, SamplingParams
from flywheel.server.body_limit import BodyLimit
from flywheel.server.openai_api import (
    OPENAI_PREFIX,
    add_openai_routes,
    finite_logprobs,
    named_field,
    openai_error,
    openai_validation_error,
    validation_problems,
)
from flywheel.server.options import ServerOptions
from flywheel.server.protocol import (
    BatchUpdateRequest,
    ChatRequest,
    GenerateRequest,
    GenerateResponse,
    InitCommunicatorRequest,
    ParamMeta,
    SamplingFields,
    UpdateNamedParamRequest,
    WorldSizeResponse,
    not_a_boolean,
)
from flywheel.server.workers import EngineFailed, EngineRejected, WorkerDied, WorkerPool
from flywheel.weight_sync import (
    CLIENT_SILENCE_S,
    DEFAULT_BUCKET_BYTES,
    ParamSpec,
    plan_buckets,
    validate_specs,
)

logger = logging.getLogger(__name__)

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.name != "extra"}
BOOLEAN_SAMPLING_FIELDS = {name for name, hint in get_type_hints(SamplingParams).items() if hint is bool}
SAMPLING_ADAPTER = TypeAdapter(SamplingParams)
_DISCONNECT_POLL_S = 0.25
# The engine samples in float32: below this temperature the scaled logits overflow (SamplingParams bounds it above).
MIN_TEMPERATURE = 1e-3
DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20


class ClientGone(Exception):
    """The client closed the connection before its result was ready."""


class ServerState:
    """What the routes share: options, the worker pool, the tokenizer and the communicator's state."""

    def __init__(self, options: ServerOptions, pool: WorkerPool, tokenizer, vocab_size: int) -> None:
        self.options = options
        self.pool = pool
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.communicator_open = False
        self.communicator_lock = asyncio.Lock()
        # Tokenizing a long text takes seconds, which /health and every other request would wait through
        # on the event loop; one thread, since a tokenizer may not be used from two at once.
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="flywheel-tokenizer")

    @property
    def max_prompt_length(self) -> int | None:
        longest = self.pool.max_model_len - 1 if self.pool.max_model_len else None
        if self.options.max_prompt_length is None:
            return longest
        return min(self.options.max_prompt_length, longest) if longest else self.options.max_prompt_length

    @property
    def default_max_tokens(self) -> int:
        """max_tokens for a request that leaves it out: 16, as vLLM and TRL's server, within --max_tokens_limit."""
        limit = self.options.max_tokens_limit
        return DEFAULT_MAX_TOKENS if limit is None else min(DEFAULT_MAX_TOKENS, limit)

    # -- prompts to token ids

    async def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return await self._tokenize(lambda: [encode_text(self.tokenizer, text) for text in texts])

    async def encode_conversations(self, conversations: list[list[dict[str, Any]]],
                                   template_kwargs: dict[str, Any]) -> list[list[int]]:
        try:
            return await self._tokenize(lambda: [encode_conversation(self.tokenizer, conversation, template_kwargs)
                                                 for conversation in conversations])
        except Exception as error:
            raise HTTPException(400, f"messages: the chat template failed: {error}") from error

    async def _tokenize(self, work: Callable[[], list[list[int]]]) -> list[list[int]]:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, work)

    # -- request checks (400 naming the field)

    def check_prompt_ids(self, prompt_ids: list[list[int]], field: str, max_tokens: int | None,
                         max_tokens_field: str = "max_tokens") -> list[list[int]]:
        """Check tokenized prompts, and that each leaves room for `max_tokens` within max_model_len
        (rather than the engine stopping early with finish_reason "length")."""
        if len(prompt_ids) > self.options.max_prompts_per_request:
            raise HTTPException(400, f"{field}: {len(prompt_ids)} prompts; at most "
                                     f"{self.options.max_prompts_per_request} per request (--max_prompts_per_request)")
        limit = self.max_prompt_length
        max_model_len = self.pool.max_model_len
        for index, ids in enumerate(prompt_ids):
            if not ids:
                raise HTTPException(400, f"{field}[{index}]: the prompt is empty")
            if limit is not None and len(ids) > limit:
                raise HTTPException(400, f"{field}[{index}]: {len(ids)} tokens; the longest prompt this "
                                         f"server takes is {limit} tokens")
            self.check_in_vocabulary(ids, f"{field}[{index}]")
            # max_tokens None means "until max_model_len": it always fits.
            if max_model_len is not None and max_tokens is not None and len(ids) + max_tokens > max_model_len:
                room = max_model_len - len(ids)
                raise HTTPException(400, f"{max_tokens_field}: {max_tokens} is too many for {field}[{index}]: at "
                                         f"most {room} (max_model_len {max_model_len} - {len(ids)} prompt tokens)")
        return prompt_ids

    def check_in_vocabulary(self, token_ids: list[int], field: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise HTTPException(400, f"{field}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def fit_default_max_tokens(self, prompt_ids: list[list[int]], max_tokens: int | None) -> int | None:
        """`max_tokens` lowered to what the longest prompt leaves within max_model_len (for defaults);
        None: all of that room."""
        if self.pool.max_model_len is None:
            return max_tokens
        room = max(1, self.pool.max_model_len - max(len(ids) for ids in prompt_ids))
        return room if max_tokens is None else min(max_tokens, room)

    def sampling_params(self, request: SamplingFields) -> dict[str, Any]:
        """The SamplingParams keyword arguments of a request, validated by SamplingParams itself."""
        extra = request.generation_kwargs
        unknown = sorted(set(extra) - SAMPLING_FIELDS)
        if unknown:
            raise HTTPException(400, f"generation_kwargs.{unknown[0]}: not a SamplingParams field "
                                     f"(known: {sorted(SAMPLING_FIELDS)})")
        max_tokens = request.max_tokens if "max_tokens" in request.model_fields_set else self.default_max_tokens
        params = dict(n=request.n, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                      min_p=request.min_p, repetition_penalty=request.repetition_penalty,
                      max_tokens=max_tokens, logprobs=request.logprobs, seed=request.seed,
                      stop=request.stop)
        params.update(extra)
        return self.checked_sampling(params, extra_names=set(extra))

    def checked_sampling(self, params: dict[str, Any], extra_names: set[str] = frozenset()) -> dict[str, Any]:
        """Check SamplingParams keyword arguments (types, ranges, this server's limits); the normalized copy."""

        def where(name: str) -> str:
            return f"generation_kwargs.{name}" if name in extra_names else name

        for name, value in params.items():
            if name in BOOLEAN_SAMPLING_FIELDS:
                continue
            try:
                for item in value if isinstance(value, list) else [value]:
                    not_a_boolean(item)
            except ValueError as error:
                raise HTTPException(400, f"{where(name)}: {error}") from error
        try:
            validated = SAMPLING_ADAPTER.validate_python(params)
        except ValidationError as error:
            problem = error.errors()[0]
            message = problem["msg"].removeprefix("Value error, ")
            # SamplingParams' own checks name their field first: "temperature must be ...".
            named = str(problem["loc"][0]) if problem["loc"] else message.split(" ", 1)[0]
            field = where(named) if named in params else "sampling parameters"
            raise HTTPException(400, f"{field}: {message}") from error
        params = {name: getattr(validated, name) for name in SAMPLING_FIELDS}
        if params["n"] > self.options.max_n:
            raise HTTPException(400, f"{where('n')}: {params['n']} is more than this server's limit {self.options.max_n}")
        if 0.0 < params["temperature"] < MIN_TEMPERATURE:
            raise HTTPException(400, f"{where('temperature')}: {params['temperature']} overflows the logits; use 0 "
                                     f"for greedy or a value in [{MIN_TEMPERATURE}, {FLOAT32_MAX:.4g}]")
        self.check_in_vocabulary(params["stop_token_ids"], where("stop_token_ids"))
        if params["logprobs"] is not None and params["logprobs"] > MAX_LOGPROBS:
            raise HTTPException(400, f"{where('logprobs')}: must be in 0..{MAX_LOGPROBS} (or null), "
                                     f"got {params['logprobs']}")
        limit = self.options.max_tokens_limit
        if limit is not None and (params["max_tokens"] is None or params["max_tokens"] > limit):
            raise HTTPException(400, f"{where('max_tokens')}: {params['max_tokens']} is more than this server's "
                                     f"limit {limit}")
        return params

    def truncate(self, prompt_ids: list[list[int]], request: SamplingFields) -> list[list[int]]:
        keep = request.truncate_prompt_tokens
        if keep == -1:
            keep = self.max_prompt_length
        return [ids[-keep:] for ids in prompt_ids] if keep else prompt_ids

    # -- generation with timeout and abort on disconnect

    async def generate(self, http_request: Request, prompt_ids: list[list[int]],
                       params: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.watch(http_request, self.pool.generate(prompt_ids, params), self.options.request_timeout)

    async def watch(self, http_request: Request, work: Awaitable, timeout_s: float):
        """Await `work`, cancelling it (which aborts its requests) on timeout or client disconnect."""
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await http_request.is_disconnected():
                    raise ClientGone()
                if loop.time() > deadline:
                    raise HTTPException(504, f"generation took longer than {timeout_s:.0f}s (--request_timeout); "
                                             "it was aborted")
        finally:
            if not task.done():
                task.cancel()
                # Let the cancellation run (it sends the aborts) before the response goes out.
                await asyncio.wait({task})


def generate_response(outputs: list[dict[str, Any]], with_logprobs: bool) -> GenerateResponse:
    completions = [completion for output in outputs for completion in output["outputs"]]
    return GenerateResponse(
        prompt_ids=[output["prompt_token_ids"] for output in outputs],
        completion_ids=[c["token_ids"] for c in completions],
        logprobs=[finite_logprobs(c["logprobs"]) for c in completions] if with_logprobs else None,
        logprob_token_ids=[c["logprob_token_ids"] for c in completions] if with_logprobs else None,
        finish_reasons=[c["finish_reason"] for c in completions],
    )


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt, as the offline LLM computes them (with the tokenizer's special tokens)."""
    return tokenizer.encode(text, add_special_tokens=True)


def encode_conversation(tokenizer, conversation: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
    kwargs = {"add_generation_prompt": not template_kwargs.get("continue_final_message", False), **template_kwargs}
    text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the format of the route's API: OpenAI's under /v1/, `{"detail": ...}` elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        content = openai_error(status, message, named_field(message))
    else:
        content = {"detail": message}
    return JSONResponse(status_code=status, content=content, headers=headers)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Here rather than after uvicorn returns: uvicorn re-raises SIGTERM once it has shut down.
        state.tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(state.pool.shutdown)

    app = FastAPI(title="flywheel generation server", lifespan=lifespan,
                  description="TRL-style generation and weight-sync endpoints, and OpenAI-compatible ones.")
    app.state.server = state
    guarded = [Depends(api_key_guard(state.options.api_key))]

    def route(method: str, path: str, endpoint: Callable, **kwargs: Any) -> None:
        # TRL's client calls "/generate/"; both spellings answer, the documented one is without.
        app.add_api_route(path, endpoint, methods=[method], dependencies=guarded, **kwargs)
        app.add_api_route(path + "/", endpoint, methods=[method], dependencies=guarded,
                          include_in_schema=False, **kwargs)

    app.add_middleware(BodyLimit, limit=int(state.options.max_request_mb * 2**20), error_response=error_response)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if request.url.path.startswith(OPENAI_PREFIX):
            return error_response(request.url.path, error.status_code, str(error.detail), error.headers)
        return await http_exception_handler(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = validation_problems(error)
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and any(tuple(problem["loc"]) == ("body",) for problem in error.errors()):
            problems = [f"body: expected JSON sent with Content-Type: application/json, got {content_type or 'none'}"]
        if request.url.path.startswith(OPENAI_PREFIX):
            return openai_validation_error(problems)
        # Only loc/msg/type: the offending input may not even be JSON (NaN, Infinity).
        errors = [{key: problem[key] for key in ("loc", "msg", "type")} for problem in error.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems), "errors": jsonable_encoder(errors)})

    @app.exception_handler(WorkerDied)
    async def _worker_died(request: Request, error: WorkerDied) -> JSONResponse:
        return error_response(request.url.path, 503, str(error))

    @app.exception_handler(EngineRejected)
    async def _engine_rejected(request: Request, error: EngineRejected) -> JSONResponse:
        return error_response(request.url.path, 400, f"the engine refused the request: {error}")

    @app.exception_handler(EngineFailed)
    async def _engine_failed(request: Request, error: EngineFailed) -> JSONResponse:
        return error_response(request.url.path, 500, str(error))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)

    async def health() -> JSONResponse:
        if state.pool.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(status_code=503, content={"status": "unavailable", "detail": state.pool.dead_reason})

    route("GET", "/health", health)

    async def get_world_size() -> WorldSizeResponse:
        return WorldSizeResponse(world_size=state.options.world_size)

    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        """Generate completions for text prompts or token-id prompts."""
        params = state.sampling_params(body)
        if isinstance(body.prompts[0], str):
            prompt_ids = await state.encode_texts(body.prompts)
        else:
            prompt_ids = body.prompts
        prompt_ids = state.check_prompt_ids(state.truncate(prompt_ids, body), "prompts", params["max_tokens"])
        outputs = await state.generate(request, prompt_ids, params)
        return generate_response(outputs, params["logprobs"] is not None)

    async def chat(body: ChatRequest, request: Request) -> GenerateResponse:
        """Generate replies to conversations, rendered with the model's chat template."""
        params = state.sampling_params(body)
        conversations = [[message.model_dump(exclude_none=True) for message in conversation]
                         for conversation in body.messages]
        prompt_ids = await state.encode_conversations(conversations, body.chat_template_kwargs)
        prompt_ids = state.check_prompt_ids(state.truncate(prompt_ids, body), "messages", params["max_tokens"])
        outputs = await state.generate(request, prompt_ids, params)
        return generate_response(outputs, params["logprobs"] is not None)

    async def init_communicator(body: InitCommunicatorRequest) -> dict:
        """Join every engine rank to the weight-sync group; returns once all ranks have met the client."""
        async with state.communicator_lock:
            return await open_communicator(body)

    async def open_communicator(body: InitCommunicatorRequest) -> dict:
        if state.communicator_open:
            raise HTTPException(409, "a communicator is already open; call /close_communicator first "
                                     "(with ?stale_only=true it is closed only if its client died)")
        expected = state.options.world_size + 1
        if body.world_size != expected:
            raise HTTPException(400, f"world_size: must be tensor_parallel_size x data_parallel_size + 1 = "
                                     f"{expected}, got {body.world_size}")
        backend = body.backend or ("nccl" if state.pool.on_gpu else "gloo")
        if backend == "nccl" and not state.pool.on_gpu:
            raise HTTPException(400, "backend: 'nccl' needs a GPU server; this one runs on the CPU (use 'gloo')")
        if body.client_device_uuid:
            server_uuids = [u for uuids in await state.pool.call_all("device_uuids") for u in uuids]
            if body.client_device_uuid in server_uuids:
                raise HTTPException(400, "client_device_uuid: the client's GPU is one the server uses; "
                                         "put the trainer on a GPU outside the server's CUDA_VISIBLE_DEVICES")
        timeout = state.options.communicator_timeout + 30
        try:
            await asyncio.wait_for(state.pool.call_all("init_communicator", body.host, body.port,
                                                       body.world_size, backend), timeout)
        except (RuntimeError, TimeoutError) as error:
            await close_group()
            raise HTTPException(504, f"the weight-sync group did not form within {state.options.communicator_timeout:.0f} s "
                                     f"(did the client join at {body.host}:{body.port}?): {error}") from error
        state.communicator_open = True
        return {}

    async def client_alive() -> bool:
        before = await state.pool.call_all("client_heartbeats")
        await asyncio.sleep(CLIENT_SILENCE_S)
        return await state.pool.call_all("client_heartbeats") != before

    def start_update(params: list[ParamMeta], bucket_bytes: int) -> dict:
        if not state.communicator_open:
            raise HTTPException(409, "no communicator is open; call /init_communicator first")
        specs = [ParamSpec(p.name, p.dtype, tuple(p.shape)) for p in params]
        try:
            validate_specs(specs, state.pool.param_shapes)
        except ValueError as error:
            raise HTTPException(400, str(error)) from error
        for future in state.pool.start_call_all("update_weights", plan_buckets(specs, bucket_bytes)):
            future.add_done_callback(close_after_a_failed_update)
        return {}

    def close_after_a_failed_update(future: asyncio.Future) -> None:
        """A failed update may leave the group mid-broadcast: close it, so that the client's next update
        gets a clear 409 and its init_communicator a fresh group."""
        if future.cancelled() or future.exception() is None:
            return
        logger.error("weight update failed, closing the weight-sync group: %s", future.exception())
        asyncio.ensure_future(close_open_group())

    async def close_open_group() -> None:
        async with state.communicator_lock:
            if state.communicator_open:
                await close_group()

    async def close_group() -> None:
        """Every engine rank leaves the group (the caller holds the communicator lock)."""
        await state.pool.call_all("close_communicator")
        state.communicator_open = False

    async def update_named_param(body: UpdateNamedParamRequest) -> dict:
        """Announce one tensor; it then arrives by broadcast from the client's rank."""
        return start_update([body], DEFAULT_BUCKET_BYTES)

    async def batch_update_named_params(body: BatchUpdateRequest) -> dict:
        """Announce tensors; they then arrive as flat buckets broadcast from the client's rank."""
        return start_update(body.params, body.bucket_bytes)

    async def stats() -> dict:
        """Per engine: whether it is generating, and its counters (tokens, prefix-cache hits, preemptions)."""
        return {"engines": await state.pool.call_all("stats")}

    async def reset_prefix_cache() -> dict:
        await state.pool.call_all("reset_prefix_cache")
        return {}

    async def close_communicator(stale_only: bool = False) -> dict:
        """Leave the weight-sync group. With `stale_only`, close it only if its client has stopped its
        heartbeat (a trainer killed without closing it), and answer 409 while that client is alive:
        a new client asks this before it joins, since its rendezvous needs the old group's port."""
        async with state.communicator_lock:
            if stale_only:
                if not state.communicator_open:
                    return {}
                if await client_alive():
                    raise HTTPException(409, "a communicator is already open and its client is alive; close it "
                                             "from that client first")
                logger.warning("the weight-sync group's client sent no heartbeat for %.0fs (it died without "
                               "closing the group): closing the group for a new client", CLIENT_SILENCE_S)
            await close_group()
        return {}

    route("GET", "/get_world_size", get_world_size)
    route("GET", "/stats", stats)
    route("POST", "/generate", generate)
    route("POST", "/chat", chat)
    route("POST", "/init_communicator", init_communicator)
    route("POST", "/update_named_param", update_named_param)
    route("POST", "/batch_update_named_params", batch_update_named_params)
    route("POST", "/reset_prefix_cache", reset_prefix_cache)
    route("POST", "/close_communicator", close_communicator)

    add_openai_routes(app, state, guarded)
    return app


def api_key_guard(api_key: str | None) -> Callable:
    """A dependency that requires `Authorization: Bearer <api_key>` when a key is set."""

    async def guard(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard
