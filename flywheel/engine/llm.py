"""LLM: the offline API — generate, chat, load weights, reset the prefix cache, sleep and wake."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import count

import torch
from tqdm.auto import tqdm

from flywheel.engine.config import EngineConfig
from flywheel.engine.engine import LLMEngine
from flywheel.engine.outputs import RequestOutput
from flywheel.engine.sampling import SamplingParams

Prompts = str | list[str] | list[list[int]]


class LLM:
    """A generation engine over a Hugging Face checkpoint folder.

    >>> llm = LLM("path/to/checkpoint")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
    """

    def __init__(self, model: str, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._request_ids = count()

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); one RequestOutput per prompt, in order.

        Text is tokenized with the tokenizer's special tokens (a BOS where the model has one), as written
        prompts expect; `chat` renders its template, which carries them, and adds none.
        """
        return self._generate(prompts, sampling_params, use_tqdm, add_special_tokens=True)

    def _generate(self, prompts: Prompts, sampling_params: SamplingParams | list[SamplingParams] | None,
                  use_tqdm: bool, add_special_tokens: bool) -> list[RequestOutput]:
        texts, token_ids = self._normalize_prompts(prompts, add_special_tokens)
        params = self._params_per_prompt(sampling_params, len(token_ids))
        request_ids = []
        try:
            for text, ids, param in zip(texts, token_ids, params):
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, ids, param, prompt=text)
                request_ids.append(request_id)
            with _collector_paused():
                return self._run(request_ids, use_tqdm)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate the next assistant turn of each conversation (a list of {role, content})."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
            )
            for conversation in conversations
        ]
        return self._generate(prompts, sampling_params, use_tqdm, add_special_tokens=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by Hugging Face name (as ``model.named_parameters()`` yields them)."""
        self.engine.load_weights(weights)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _normalize_prompts(self, prompts: Prompts, add_special_tokens: bool) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if all(isinstance(p, str) for p in prompts):
            return list(prompts), [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
            return [None] * len(prompts), [list(p) for p in prompts]
        raise ValueError("prompts must be all strings or all lists of token ids")

    @staticmethod
    def _params_per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts")
        return list(sampling_params)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generating") as progress:
            while wanted - finished.keys():
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine stopped with requests unfinished")
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        return [finished[request_id] for request_id in request_ids]


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a batch generates.

    A rollout keeps hundreds of thousands of young objects alive until it ends (token lists, logprobs)
    and frees them by reference counting; meanwhile each collection would walk them again, pauses of
    several milliseconds in which the host falls behind the GPU. Cycles made meanwhile are collected
    once it is back on; a collector already off stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
