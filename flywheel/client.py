"""GenerationClient: talk to a `flywheel serve` server over HTTP and push weights to it by broadcast."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import torch

from flywheel.weight_sync import DEFAULT_BUCKET_BYTES, WeightSyncGroup, dtype_name, send_buckets

logger = logging.getLogger(__name__)

_IDEMPOTENT_RETRIES = 3


class GenerationClient:
    """The client of the generation server (the shape of TRL's `VLLMClient`).

    >>> with GenerationClient(server_port=8000) as client:
    ...     out = client.generate(["Hello"], max_tokens=8, temperature=0.0)
    ...     client.init_communicator(device="cuda:0")
    ...     client.update_model_params(model)
    """

    def __init__(self, base_url: str | None = None, host: str = "127.0.0.1", server_port: int = 8000,
                 group_port: int = 51216, connection_timeout: float = 240.0, request_timeout: float | None = 600.0,
                 api_key: str | None = None) -> None:
        """`request_timeout`: seconds to wait for an answer; None waits as long as the server takes (its
        --request_timeout bounds a generation)."""
        if base_url is None:
            base_url = f"http://{host}:{_port('server_port', server_port)}"
        self.base_url = base_url.rstrip("/")
        self.host = _hostname(base_url)
        self.group_port = _port("group_port", group_port)
        self.request_timeout = None if request_timeout is None else _seconds("request_timeout", request_timeout)
        connection_timeout = _seconds("connection_timeout", connection_timeout)
        api_key = api_key if api_key is not None else os.environ.get("FLYWHEEL_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout or 10.0)))
        self.group: WeightSyncGroup | None = None
        self.check_server(connection_timeout)

    # -- HTTP plumbing

    def check_server(self, total_timeout: float = 240.0, retry_interval: float = 1.0) -> None:
        """Wait until the server answers /health (it may still be loading), or raise ConnectionError."""
        deadline = time.monotonic() + total_timeout
        last = "no answer"
        while True:
            try:
                response = self.http.get("/health", timeout=min(5.0, self.request_timeout or 5.0))
                if response.status_code == 200:
                    return
                if response.status_code == 401:
                    raise PermissionError(
                        f"the generation server at {self.base_url} refused the API key: pass api_key= or set "
                        "FLYWHEEL_API_KEY to the key the server was started with (--api-key)"
                    )
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as error:
                last = f"{type(error).__name__}: {error}"
            if time.monotonic() + retry_interval > deadline:
                raise ConnectionError(
                    f"the generation server at {self.base_url} was not healthy within {total_timeout:.0f}s "
                    f"({last}); start it with `flywheel serve --model PATH --port PORT` and check its log"
                )
            time.sleep(retry_interval)

    def _request(self, method: str, path: str, payload: dict | None = None, retry: bool = False,
                 timeout: float | None = None) -> dict[str, Any]:
        attempts = _IDEMPOTENT_RETRIES if retry else 1
        for attempt in range(attempts):
            try:
                response = self.http.request(method, path, json=payload,
                                             timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
                break
            except httpx.TimeoutException as error:
                raise TimeoutError(f"{method} {path}: the server did not answer within the timeout ({error}); "
                                   "raise request_timeout or check the server's log") from error
            except httpx.TransportError as error:
                if attempt + 1 == attempts:
                    raise ConnectionError(f"{method} {path}: cannot reach {self.base_url} ({error})") from error
                time.sleep(0.5 * (attempt + 1))
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            message = f"{method} {path} -> HTTP {response.status_code}: {detail}"
            raise (ValueError if response.status_code < 500 else RuntimeError)(message)
        return response.json()

    # -- generation

    def generate(self, prompts: list[str] | list[list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 max_tokens: int = 16, logprobs: int | None = 0, seed: int | None = None,
                 stop: list[str] | None = None, generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Complete prompts; returns prompt_ids, completion_ids (grouped by prompt), logprobs,
        logprob_token_ids ([completion][token][k], sampled token first) and finish_reasons."""
        payload = dict(prompts=prompts, **self._sampling(n, temperature, top_p, top_k, min_p, repetition_penalty,
                                                         max_tokens, logprobs, seed, stop, generation_kwargs))
        return self._request("POST", "/generate", payload)

    def chat(self, messages: list[list[dict[str, Any]]], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = -1, min_p: float = 0.0, repetition_penalty: float = 1.0, max_tokens: int = 16,
             logprobs: int | None = 0, seed: int | None = None, stop: list[str] | None = None,
             generation_kwargs: dict[str, Any] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Reply to conversations (lists of {role, content}); returns the same fields as `generate`."""
        payload = dict(messages=messages, chat_template_kwargs=chat_template_kwargs or {},
                       **self._sampling(n, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens,
                                        logprobs, seed, stop, generation_kwargs))
        return self._request("POST", "/chat", payload)

    @staticmethod
    def _sampling(n, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, logprobs, seed, stop,
                  generation_kwargs) -> dict[str, Any]:
        return dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repetition_penalty=repetition_penalty, max_tokens=max_tokens, logprobs=logprobs, seed=seed,
                    stop=stop, generation_kwargs=generation_kwargs or {})

    def get_world_size(self) -> int:
        """Engine ranks of the server (tensor_parallel_size x data_parallel_size)."""
        return self._request("GET", "/get_world_size", retry=True)["world_size"]

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache", retry=True)

    # -- weight sync

    def init_communicator(self, device: str | int | torch.device = "cpu", timeout: float = 120.0) -> None:
        """Join the server's weight-sync group as its last rank (NCCL from a GPU, Gloo from the CPU)."""
        if self.group is not None:
            raise RuntimeError("the communicator is already open; call close_communicator() first")
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        uuid = None
        if device.type == "cuda":
            torch.cuda.set_device(device)
            uuid = str(torch.cuda.get_device_properties(device).uuid)
        world_size = self.get_world_size() + 1
        # A trainer killed without closing its group leaves it open on the server, holding the port:
        # the server closes such a group (its heartbeat has stopped) and answers 409 to a live one.
        self._request("POST", "/close_communicator?stale_only=true")
        outcome: dict[str, Any] = {}

        def join() -> None:
            try:
                outcome["group"] = WeightSyncGroup(self.host, self.group_port, world_size - 1, world_size, backend,
                                                   device, timeout)
            except Exception as error:
                outcome["error"] = error

        # The server answers only once every rank, this one included, has joined: join meanwhile.
        joiner = threading.Thread(target=join, name="weight-sync-join", daemon=True)
        joiner.start()
        self._request("POST", "/init_communicator", {"host": self.host, "port": self.group_port,
                                                     "world_size": world_size, "backend": backend,
                                                     "client_device_uuid": uuid}, timeout=timeout + 60)
        joiner.join(timeout + 5)
        if "error" in outcome:
            raise outcome["error"]
        if "group" not in outcome:
            raise TimeoutError(f"joining the weight-sync group at {self.host}:{self.group_port} took over {timeout}s")
        self.group = outcome["group"]
        self.group.start_heartbeat()

    def update_named_param(self, name: str, tensor: torch.Tensor) -> None:
        """Replace one parameter (full, unsharded, HF name) on every server rank."""
        self._require_group()
        _check_sendable([(name, tensor)])
        self._request("POST", "/update_named_param",
                      {"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)})
        self._send([(name, tensor)], DEFAULT_BUCKET_BYTES)

    def update_model_params(self, model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Push every parameter of `model` in a few flat buckets: one HTTP call, then the broadcasts."""
        named = [(_hf_name(name), param.detach()) for name, param in model.named_parameters()]
        self.update_named_params(named, bucket_bytes)

    def update_named_params(self, named_tensors: list[tuple[str, torch.Tensor]],
                            bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        """Push (name, tensor) pairs in a few flat buckets; the server checks names and shapes first."""
        self._require_group()
        _check_sendable(named_tensors)
        params = [{"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for name, t in named_tensors]
        self._request("POST", "/batch_update_named_params", {"params": params, "bucket_bytes": bucket_bytes})
        self._send(named_tensors, bucket_bytes)

    def _send(self, named_tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        try:
            send_buckets(self.group, named_tensors, bucket_bytes)
        except Exception as error:
            # The server closes its side of the group after a failed update; so does this side.
            self.group.close()
            self.group = None
            raise RuntimeError(f"{error}. The weight-sync group is closed: call init_communicator() to open a "
                               "new one before the next update") from error

    def close_communicator(self) -> None:
        """Leave the weight-sync group (a no-op when none is open, and on this side only when the server
        is gone)."""
        if self.group is None:
            return
        try:
            self._request("POST", "/close_communicator")
        except ConnectionError:
            logger.debug("the server is gone; closing this side of the weight-sync group only")
        finally:
            self.group.close()
            self.group = None

    def _require_group(self) -> None:
        if self.group is None:
            raise RuntimeError("no communicator is open; call init_communicator(device) first")

    # -- lifetime

    def close(self) -> None:
        try:
            self.close_communicator()
        finally:
            self.http.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _hostname(base_url: str) -> str:
    """The host of `base_url`, which must look like http://HOST:PORT."""
    try:
        parsed = urlparse(base_url)
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname) and parsed.port != 0
    except ValueError:  # a port that is not a number in 0..65535
        valid = False
    if not valid:
        raise ValueError(f"base_url must look like http://HOST:PORT, got {base_url!r}")
    return parsed.hostname


def _port(name: str, port: Any) -> int:
    if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        raise ValueError(f"{name} must be a TCP port in 1..65535, got {port!r}")
    return port


def _seconds(name: str, value: Any) -> float:
    # NaN or infinity would make the waits on the server endless.
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value


def _check_sendable(named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse, before the server is told of an update, a tensor that cannot be sent."""
    for name, tensor in named_tensors:
        if tensor.is_meta:
            raise ValueError(f"{name}: the tensor has no data (it is on the meta device, e.g. offloaded); "
                             "gather the full parameter before pushing it")


def _hf_name(name: str) -> str:
    # Wrappers prefix names (torch.compile, DistributedDataParallel, in either order); the server knows
    # the HF names.
    wrapped = None
    while wrapped != name:
        wrapped = name
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
    return name
