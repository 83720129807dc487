"""The OpenAI-compatible endpoints as OpenAI's clients see them: top logprobs (a masked token's as -9999.0),
the error body, defaults and nulls, text parts, the model endpoints."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from flywheel import LLM, SamplingParams
from flywheel.server.launch import launch_server
from flywheel.server.openai_api import finite_logprobs

openai = pytest.importorskip("openai")

MODEL = "qwen2"  # the served folder's name stands for it
MAX_MODEL_LEN = 1024  # the tiny model's
VOCAB_SIZE = 272  # the tiny model's
MAX_TOKENS_LIMIT = 100
HI = [{"role": "user", "content": "hi"}]
GREEDY = dict(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with launch_server(tiny_checkpoints["qwen2"], log_path=log, kv_cache_memory_gb=0.05,
                       max_tokens_limit=MAX_TOKENS_LIMIT) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def offline(tiny_checkpoints):
    return LLM(tiny_checkpoints["qwen2"], kv_cache_memory_gb=0.05)


def logprobs_by_likelihood(step: dict) -> list[tuple[int, float]]:
    return sorted(((token_id, entry.logprob) for token_id, entry in step.items()), key=lambda pair: -pair[1])


def test_chat_top_logprobs_are_the_k_most_likely_tokens_chosen_one_included(api, offline):
    chat = api.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=3, **GREEDY)

    reference = offline.chat(HI, SamplingParams(logprobs=3, **GREEDY))[0].outputs[0]
    content = chat.choices[0].logprobs.content
    assert len(content) == len(reference.token_ids)
    for entry, step in zip(content, reference.logprobs):
        top_three = [logprob for _, logprob in logprobs_by_likelihood(step)[:3]]
        assert [alternative.logprob for alternative in entry.top_logprobs] == pytest.approx(top_three, abs=1e-4)
        # Greedy: the chosen token is the most likely one.
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert entry.bytes == list(entry.token.encode())


def test_completion_top_logprobs_hold_the_top_k_and_the_chosen_token(api, offline, tiny_checkpoints):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2"])
    completion = api.completions.create(model=MODEL, prompt="hello there", logprobs=2, **GREEDY)

    reference = offline.generate(["hello there"], SamplingParams(logprobs=2, **GREEDY))[0].outputs[0]
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in reference.token_ids]
    for token, token_logprob, top, step in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                               reference.logprobs):
        expected: dict[str, float] = {}
        for token_id, logprob in logprobs_by_likelihood(step):  # tokens whose text is alike: the likeliest
            expected.setdefault(tokenizer.decode([token_id]), logprob)
        assert top == pytest.approx(expected, abs=1e-4)
        assert top[token] == token_logprob
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]


def test_streamed_text_offsets_continue_from_chunk_to_chunk(api):
    request = dict(model=MODEL, prompt="hello there", logprobs=1, **GREEDY)
    whole = api.completions.create(**request).choices[0].logprobs
    chunks = [chunk.choices[0].logprobs for chunk in api.completions.create(stream=True, **request)
              if chunk.choices and chunk.choices[0].logprobs]

    assert len(chunks) > 1
    assert [offset for chunk in chunks for offset in chunk.text_offset] == whole.text_offset
    assert [top for chunk in chunks for top in chunk.top_logprobs] == whole.top_logprobs


# Until min_tokens, every stop token is masked out (its logprob is -inf): here all tokens but "a" and "b".
ALL_BUT_A_AND_B = [token_id for token_id in range(VOCAB_SIZE) if token_id not in (ord("a"), ord("b"))]
MASKED = dict(temperature=0.0, max_tokens=3, min_tokens=3, stop_token_ids=ALL_BUT_A_AND_B)
MASKED_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "logprobs": 5, **MASKED}),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 5, **MASKED}),
]


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def choice_logprobs(choice: dict) -> tuple[list[float], list[float]]:
    """The sampled tokens' logprobs and their alternatives', from a completion or chat choice."""
    logprobs = choice["logprobs"]
    if "content" in logprobs:
        entries = logprobs["content"]
        return [e["logprob"] for e in entries], [top["logprob"] for e in entries for top in e["top_logprobs"]]
    return logprobs["token_logprobs"], [value for top in logprobs["top_logprobs"] for value in top.values()]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path,payload", MASKED_REQUESTS, ids=[path for path, _ in MASKED_REQUESTS])
def test_masked_tokens_logprob_goes_out_as_minus_9999_in_strict_json(http, path, payload, stream):
    response = http.post(path, json={**payload, "stream": stream})

    assert response.status_code == 200, response.text
    if stream:
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        choices = [choice for event in events[:-1] for choice in strict_json(event)["choices"] if choice["logprobs"]]
    else:
        choices = strict_json(response.text)["choices"]
    per_choice = [choice_logprobs(choice) for choice in choices]
    sampled = [logprob for chosen, _ in per_choice for logprob in chosen]
    alternatives = [logprob for _, others in per_choice for logprob in others]
    assert len(sampled) == 3 and all(-9999.0 < logprob <= 0.0 for logprob in sampled)  # "a" or "b"
    assert -9999.0 in alternatives and all(math.isfinite(logprob) for logprob in alternatives)


def test_generate_sends_a_masked_tokens_logprob_as_minus_9999(http):
    masked = {key: MASKED[key] for key in ("min_tokens", "stop_token_ids")}
    response = http.post("/generate", json={"prompts": ["hi"], "logprobs": 5, "temperature": 0.0, "max_tokens": 3,
                                            "generation_kwargs": masked})

    assert response.status_code == 200, response.text
    rows = strict_json(response.text)["logprobs"][0]
    assert len(rows) == 3
    assert all(-9999.0 < row[0] <= 0.0 and row[1:].count(-9999.0) == 3 for row in rows)  # "a" or "b", then the rest


def test_min_tokens_with_every_token_a_stop_token_gets_400(http):
    every_token = list(range(VOCAB_SIZE))
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "min_tokens": 3,
                                                  "stop_token_ids": every_token})

    assert response.status_code == 400, response.text
    assert "min_tokens" in response.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_finite_logprobs_replace_only_what_json_cannot_carry():
    finite = [[-0.25, -3.5], [-12000.0]]

    assert finite_logprobs(finite) is finite
    assert finite_logprobs([[-0.25, float("-inf")], [float("nan")]]) == [[-0.25, -9999.0], [-9999.0]]


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": HI, "temperature": 5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "tempreature": 0.5}, 400, "tempreature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": False, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": HI, "model": "other-model"}, 404, "model"),
    # A lone surrogate, which JSON can escape, is no text a tokenizer can encode.
    ("/v1/completions", {"prompt": "\ud800", "stream": True}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}, 400, "messages"),
    # JSON's true and false are no numbers (pydantic would read them as 1 and 0).
    ("/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": HI, "n": True}, 400, "n"),
    # Stop tokens outside the vocabulary would make the sampler fail (it masks them until min_tokens).
    ("/v1/completions", {"prompt": "x", "min_tokens": 1, "stop_token_ids": [VOCAB_SIZE]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": {"chat_template": "{{ messages }}"}}, 400,
     "chat_template_kwargs"),
]


@pytest.mark.parametrize("path,payload,status,field", BAD_REQUESTS, ids=[f"{b[0]}:{b[3]}" for b in BAD_REQUESTS])
def test_bad_request_gets_openais_error_body_naming_the_field(http, path, payload, status, field):
    # json.dumps escapes what httpx would send raw (a lone surrogate cannot be UTF-8 encoded).
    response = http.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == field and error["message"].startswith(f"{field}")
    assert error["code"] is None


def test_openai_client_reads_the_error(api):
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL, messages=HI, temperature=5)

    assert refused.value.param == "temperature" and refused.value.type == "invalid_request_error"
    assert "temperature" in refused.value.message


def test_errors_outside_a_field_have_a_null_param(http):
    malformed = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    unknown_route = http.post("/v1/embeddings", json={"input": "x"})

    assert malformed.status_code == 400 and malformed.json()["error"]["param"] is None
    assert unknown_route.status_code == 404 and unknown_route.json()["error"]["type"] == "not_found_error"


def test_trl_routes_keep_their_error_body(http):
    response = http.post("/generate", json={"prompts": ["x"], "temperature": -1})

    assert response.status_code == 422 and "temperature" in response.json()["detail"]


def test_non_text_content_part_gets_400_naming_the_part(http):
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})

    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("messages[0].content: part 1 is of type 'image_url'")


def test_text_content_parts_are_joined_as_one_text(api):
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    from_parts = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], **GREEDY)
    from_text = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "be\nbrief"}], **GREEDY)

    assert from_parts.usage.prompt_tokens == from_text.usage.prompt_tokens
    assert from_parts.choices[0].message.content == from_text.choices[0].message.content


def test_trl_chat_takes_text_parts_too(http):
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    conversations = [[{"role": "user", "content": parts}], [{"role": "user", "content": "be\nbrief"}]]
    response = http.post("/chat", json={"messages": conversations, **GREEDY})

    assert response.status_code == 200, response.text
    from_parts, from_text = response.json()["prompt_ids"]
    assert from_parts == from_text


OPTIONAL_FIELDS = ["temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
                   "user", "stream", "stream_options", "model", "top_k", "min_p", "repetition_penalty", "min_tokens",
                   "stop_token_ids"]


def test_nulls_mean_the_defaults(http):
    nulls = {name: None for name in OPTIONAL_FIELDS}
    completion = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "logprobs": None,
                                                    "echo": False, **nulls})
    chat = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": None, "max_completion_tokens": 4,
                                                   "logprobs": None, "top_logprobs": None, **nulls})
    empty_bias = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 4, "logit_bias": {}})

    for response in (completion, chat, empty_bias):
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 1
        assert response.json()["choices"][0]["logprobs"] is None


def test_chat_without_max_tokens_may_fill_the_context_up_to_max_tokens_limit(http):
    long_conversation = [{"role": "user", "content": "x" * (MAX_MODEL_LEN - 60)}]

    long_chat = http.post("/v1/chat/completions", json={"messages": long_conversation, "ignore_eos": True}).json()
    short_chat = http.post("/v1/chat/completions", json={"messages": HI, "ignore_eos": True}).json()

    room = MAX_MODEL_LEN - long_chat["usage"]["prompt_tokens"]
    assert 16 < room < MAX_TOKENS_LIMIT
    assert long_chat["usage"]["completion_tokens"] == room
    assert short_chat["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT


def test_completion_without_max_tokens_gets_openais_16(http):
    completion = http.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True}).json()

    assert completion["usage"]["completion_tokens"] == 16


def test_model_endpoint_describes_the_served_model(api, http):
    served = api.models.list().data[0]

    assert api.models.retrieve(served.id) == served
    assert api.models.retrieve(served.id.rstrip("/").rsplit("/", 1)[-1]).id == served.id
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("other-model")
    unknown = http.get("/v1/models/other-model")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error" and unknown.json()["error"]["param"] == "model"
    assert "'other-model' is not served here" in unknown.json()["error"]["message"]
