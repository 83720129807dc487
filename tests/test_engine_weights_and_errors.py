"""Live weight updates by Hugging Face name, and clear errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import hf_greedy
from flywheel import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [list(range(60, 93)), [3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["qwen2"], dtype="float32")


def test_load_weights_makes_outputs_equal_the_other_checkpoint(tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    llm.generate(PROMPTS, GREEDY)  # fills the prefix cache with model A's keys and values
    model_b = hf_models["qwen2_b"]
    llm.load_weights(model_b.named_parameters())
    assert not llm.engine.block_manager.hash_to_block_id  # the prefix cache was reset
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert output.outputs[0].token_ids == hf_greedy(model_b, prompt, 16)


def test_load_weights_refuses_unknown_names_and_wrong_shapes_whole(llm, hf_models):
    before = llm.generate(PROMPTS, GREEDY)
    good = list(hf_models["qwen2_b"].named_parameters())
    with pytest.raises(ValueError, match="unknown weight 'model.layers.0.mlp.nonexistent.weight'"):
        llm.load_weights(good + [("model.layers.0.mlp.nonexistent.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"has shape \(64, 65\), expected \(64, 64\)"):
        llm.load_weights(good[:-1] + [("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 65))])
    after = llm.generate(PROMPTS, GREEDY)  # nothing was applied
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]


def test_a_second_push_reuses_the_targets_and_lands_whole(llm, hf_models):
    llm.load_weights(hf_models["qwen2_b"].named_parameters())
    targets = dict(llm.engine.runner.model._weight_targets.by_name)
    model_a = hf_models["qwen2"]
    llm.load_weights(model_a.named_parameters())
    assert llm.engine.runner.model._weight_targets.by_name == targets
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert output.outputs[0].token_ids == hf_greedy(model_a, prompt, 16)


def test_a_bad_name_in_a_second_push_refuses_it_whole(llm, hf_models):
    llm.load_weights(hf_models["qwen2_b"].named_parameters())
    before = {name: param.clone() for name, param in llm.engine.runner.model.named_parameters()}
    bad_name = "model.layers.0.mlp.nonexistent.weight"
    update = list(hf_models["qwen2"].named_parameters()) + [(bad_name, torch.zeros(3))]
    with pytest.raises(ValueError, match=f"unknown weight '{bad_name}'"):
        llm.load_weights(update)
    for name, param in llm.engine.runner.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_a_parameter_or_its_storage_replaced_after_a_push_is_what_the_next_push_writes(tiny_checkpoints, hf_models):
    # An engine of its own (a small cache beside the module's): replaced parameters are not what a
    # GPU engine's captured graphs read.
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", kv_cache_memory_gb=0.25)
    model, model_a = llm.engine.runner.model, hf_models["qwen2"]
    llm.load_weights(hf_models["qwen2_b"].named_parameters())
    model.norm.weight = torch.nn.Parameter(torch.zeros_like(model.norm.weight), requires_grad=False)
    qkv = model.layers[0].self_attn.qkv_proj.weight
    qkv.data = torch.zeros_like(qkv)
    llm.load_weights(model_a.named_parameters())
    attention = model_a.model.layers[0].self_attn
    assert torch.equal(model.norm.weight.cpu(), model_a.model.norm.weight)
    pushed_qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(qkv.cpu(), pushed_qkv)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature must be in \[0, 3.403e\+38\]"),
        (dict(n=0), "n must be an integer >= 1"),
        (dict(top_k=-5), "top_k must be -1"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs_mode="softmax"), "logprobs_mode"),
        (dict(skip_special_tokens=None), "skip_special_tokens must be true or false"),
        (dict(temperature="hot"), "temperature must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(temperature=1e39), r"temperature must be in \[0, 3.403e\+38\]"),
        (dict(repetition_penalty=1e-300), r"repetition_penalty must be in \[0.0001, 10000\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be in"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(logprobs=1.5), "logprobs must be an integer"),
    ],
)
def test_invalid_sampling_params_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_raise(llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 1024], GREEDY)
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        llm.generate([[1, 99999]], GREEDY)
    with pytest.raises(ValueError, match="non-empty list"):
        llm.generate([], GREEDY)
    with pytest.raises(ValueError, match=r"n \(1000\) must be <= max_num_seqs"):
        llm.generate([[1, 2]], SamplingParams(n=1000))
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 272\); got \[9223372036854775807\]"):
        llm.generate([[1, 2]], SamplingParams(min_tokens=2, stop_token_ids=[2**63 - 1]))
    seeded = dict(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    [whole] = llm.generate([[1, 2]], SamplingParams(top_k=2**63, **seeded))
    [off] = llm.generate([[1, 2]], SamplingParams(top_k=-1, **seeded))
    assert whole.outputs[0].token_ids == off.outputs[0].token_ids  # a top_k beyond the vocabulary keeps every token
    every_token = list(range(llm.engine.hf_config.vocab_size))
    with pytest.raises(ValueError, match="min_tokens: the stop tokens .* are every token"):
        llm.generate([[1, 2]], SamplingParams(min_tokens=2, stop_token_ids=every_token))
    # The engine still serves after refusing.
    assert llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids


CUSTOM_CONFIG = """from transformers import Qwen2Config


class MarkedQwen2Config(Qwen2Config):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.defined_by_the_checkpoint = True
"""


def test_trust_remote_code_lets_the_checkpoint_define_its_configuration(tiny_checkpoints, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_checkpoints["qwen2"], folder)
    (folder / "configuration_marked.py").write_text(CUSTOM_CONFIG)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_marked.MarkedQwen2Config"}
    (folder / "config.json").write_text(json.dumps(config))

    assert not hasattr(LLM(str(folder), dtype="float32").engine.hf_config, "defined_by_the_checkpoint")
    trusted = LLM(str(folder), dtype="float32", trust_remote_code=True)
    assert trusted.engine.hf_config.defined_by_the_checkpoint
    assert trusted.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids


def test_unknown_architecture_raises(tiny_checkpoints, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(tiny_checkpoints["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture"):
        LLM(str(folder))


def test_a_checkpoint_that_lacks_a_weight_or_a_file_of_its_index_raises(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "without_a_weight"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights the model needs, e.g. model.layers.1.mlp.down_proj.weight"):
        LLM(str(folder))

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).save_pretrained(sharded, max_shard_size="200KB")
    shutil.copy(f"{tiny_checkpoints['llama']}/tokenizer.json", sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks 1 of the {len(shards)} files its index names: {shards[1].name}"):
        LLM(str(sharded))


def test_bad_engine_options_raise(tiny_checkpoints):
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(tiny_checkpoints["qwen2"], dtype="float8")
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        LLM(tiny_checkpoints["qwen2"], max_model_len=10**6)
    with pytest.raises(ValueError, match="KV cache holds"):
        LLM(tiny_checkpoints["qwen2"], num_kv_blocks=2, max_model_len=512)
    with pytest.raises(ValueError, match="kv_cache_memory_gb must be > 0"):
        LLM(tiny_checkpoints["qwen2"], kv_cache_memory_gb=-1.0)


def test_sleep_releases_the_cache_and_wake_up_restores_it(llm):
    expected = llm.generate(PROMPTS, GREEDY)
    llm.sleep()
    assert llm.engine.runner.kv_caches == []
    with pytest.raises(RuntimeError, match="wake_up"):
        llm.generate(PROMPTS, GREEDY)
    llm.wake_up()
    got = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_shutdown_releases_the_cache_and_refuses_further_requests(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    llm.generate(PROMPTS, GREEDY)
    llm.shutdown()
    assert llm.engine.runner.kv_caches == []
    for use in (lambda: llm.generate(PROMPTS, GREEDY), llm.wake_up):
        with pytest.raises(RuntimeError, match="shut down"):
            use()
    llm.shutdown()  # a second call does nothing


HUB_ID_SCRIPT = """
import json, sys
from flywheel import LLM, SamplingParams
greedy = SamplingParams(temperature=0.0, max_tokens=8)
outputs = {}
for revision in (None, "v2"):
    outputs[str(revision)] = LLM("testorg/tiny", revision=revision, kv_cache_memory_gb=0.05).generate(
        ["hello"], greedy)[0].outputs[0].token_ids
try:
    LLM("testorg/absent", kv_cache_memory_gb=0.05)
except ValueError as error:
    outputs["absent"] = str(error)
print(json.dumps(outputs))
"""


def test_a_hub_id_and_its_revision_load_from_the_hugging_face_cache(tiny_checkpoints, tmp_path):
    # A cache as the hub leaves it: snapshots by commit, and refs naming them.
    repo = tmp_path / "hub" / "models--testorg--tiny"
    for ref, commit, name in (("main", "a" * 40, "qwen2"), ("v2", "b" * 40, "qwen2_b")):
        shutil.copytree(tiny_checkpoints[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", HUB_ID_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = json.loads(run.stdout.splitlines()[-1])

    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    for revision, name in (("None", "qwen2"), ("v2", "qwen2_b")):
        folder = LLM(tiny_checkpoints[name], kv_cache_memory_gb=0.05)
        assert outputs[revision] == folder.generate(["hello"], greedy)[0].outputs[0].token_ids
    assert "testorg/absent" in outputs["absent"] and "not a folder" in outputs["absent"]
