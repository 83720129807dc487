"""Tensor and data parallelism on several GPUs: tp=2 greedy tokens equal tp=1 in float32 and its bf16
logprobs stay close; a dp server on its own GPUs generates what the offline engine does; a weight
push over NCCL from a trainer GPU reaches every engine of a dp=2 server.

Each test skips itself when fewer GPUs are visible than it needs (2, or 3 and 4 for some)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel import GenerationClient, LLM, SamplingParams
from flywheel.server.launch import free_port, launch_server
from flywheel.testing import write_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

TOKEN_PROMPTS = [[5, 6, 7], list(range(20, 57)), [9] * 16, list(range(100, 117)), [42], list(range(200, 260))]
TEXT_PROMPTS = ["hello there", "The quick brown fox", "1 2 3 4", "abc", "zzz top", "x", "a longer prompt, with commas"]
GREEDY = dict(temperature=0.0, max_tokens=12)
DEVICE = "cuda"  # the offline engines' device ("cpu" runs the same checks on Gloo, for trying them out)


def require_gpus(count: int) -> None:
    visible = torch.cuda.device_count()
    if visible < count:
        pytest.skip(f"needs {count} GPUs, {visible} visible")


def physical_gpus(count: int) -> str:
    """CUDA_VISIBLE_DEVICES for a child process that should see this process's first `count` GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ",".join(ids[:count])


def greedy_tokens(checkpoint: str, prompts, dtype: str = "float32", **engine) -> list[list[int]]:
    """Greedy completions (EOS ignored) from an offline engine that is shut down afterwards."""
    llm = LLM(checkpoint, dtype=dtype, device=DEVICE, gpu_memory_utilization=0.3, max_num_seqs=64, **engine)
    try:
        params = SamplingParams(ignore_eos=True, **GREEDY)
        return [c.token_ids for out in llm.generate(prompts, params) for c in out.outputs]
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("architecture,enforce_eager", [("qwen2", True), ("qwen2", False), ("qwen3", False),
                                                        ("llama", False)])
def test_tp2_greedy_tokens_equal_tp1_in_float32(architecture, enforce_eager, tiny_checkpoints):
    require_gpus(2)
    checkpoint = tiny_checkpoints[architecture]
    single = greedy_tokens(checkpoint, TOKEN_PROMPTS, enforce_eager=enforce_eager)
    sharded = greedy_tokens(checkpoint, TOKEN_PROMPTS, enforce_eager=enforce_eager, tensor_parallel_size=2)
    assert sharded == single


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> str:
    """A random model wide enough that a sharded bf16 matmul reduces in a different order (hidden 1024)."""
    path = tmp_path_factory.mktemp("wide") / "qwen2-1024"
    return str(write_tiny_checkpoint(path, "qwen2", seed=4, hidden_size=1024, intermediate_size=2816,
                                     num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
                                     vocab_size=4096))


def next_token_logprobs(checkpoint: str, prompts: list[list[int]], tensor_parallel_size: int) -> list[dict[int, float]]:
    """Raw top-8 next-token logprobs after each prompt, bf16."""
    llm = LLM(checkpoint, dtype="bfloat16", device=DEVICE, gpu_memory_utilization=0.3, max_num_seqs=256,
              tensor_parallel_size=tensor_parallel_size)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=8, logprobs_mode="raw", ignore_eos=True)
        outs = llm.generate(prompts, params)
        return [{token: lp.logprob for token, lp in out.outputs[0].logprobs[0].items()} for out in outs]
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()


def test_tp2_bf16_logprobs_within_tolerance_of_tp1(wide_checkpoint):
    require_gpus(2)
    # Every prefix of a few sequences, so both engines score exactly the same contexts (no divergence).
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 256, (40,), generator=generator).tolist() for _ in range(4)]
    prompts = [sequence[:end] for sequence in sequences for end in range(8, 41, 4)]
    single = next_token_logprobs(wide_checkpoint, prompts, tensor_parallel_size=1)
    sharded = next_token_logprobs(wide_checkpoint, prompts, tensor_parallel_size=2)

    top_found = sum(max(one, key=one.get) in two for one, two in zip(single, sharded))
    assert top_found >= 0.95 * len(prompts), f"tp=1's top token in tp=2's top-8 for only {top_found}/{len(prompts)}"
    worst = max(abs(one[t] - two[t]) for one, two in zip(single, sharded) for t in one.keys() & two.keys())
    assert worst < 0.1, f"largest tp=2 vs tp=1 logprob difference {worst:.4f}"  # top-8 spread ~0.8


@pytest.fixture(scope="module")
def references(tiny_checkpoints) -> dict[str, list[list[int]]]:
    """Offline float32 greedy completions of the text prompts, for both tiny qwen2 checkpoints."""
    require_gpus(1)
    result = {}
    for name in ("qwen2", "qwen2_b"):
        llm = LLM(tiny_checkpoints[name], dtype="float32", device=DEVICE, gpu_memory_utilization=0.3, max_model_len=512)
        result[name] = [c.token_ids for out in llm.generate(TEXT_PROMPTS, SamplingParams(**GREEDY)) for c in out.outputs]
        llm.shutdown()
    torch.cuda.empty_cache()
    return result


@pytest.mark.parametrize("tp,dp", [(1, 2), (2, 1), (2, 2), (1, 4)], ids=["tp1dp2", "tp2dp1", "tp2dp2", "tp1dp4"])
def test_server_layout_gives_the_offline_greedy_outputs(tp, dp, tiny_checkpoints, references, tmp_path):
    require_gpus(tp * dp)
    with launch_server(tiny_checkpoints["qwen2"], log_path=tmp_path / "server.log", tensor_parallel_size=tp,
                       data_parallel_size=dp, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                       env={"CUDA_VISIBLE_DEVICES": physical_gpus(tp * dp)}) as server:
        with GenerationClient(base_url=server.base_url, connection_timeout=60) as client:
            assert client.get_world_size() == tp * dp
            out = client.generate(TEXT_PROMPTS, n=2, **GREEDY)
            engines = client.http.get("/stats").json()["engines"]
    assert out["completion_ids"] == [ids for ids in references["qwen2"] for _ in range(2)]
    assert len(engines) == dp and all(engine["generated_tokens"] > 0 for engine in engines)  # every engine served


def test_nccl_push_from_a_trainer_gpu_reaches_both_engines_of_a_dp2_server(tiny_checkpoints, references, tmp_path):
    require_gpus(3)  # the server on GPUs 0-1, the trainer on GPU 2 (a client may not share a server GPU)
    with launch_server(tiny_checkpoints["qwen2"], log_path=tmp_path / "server.log", data_parallel_size=2,
                       dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                       env={"CUDA_VISIBLE_DEVICES": physical_gpus(2)}) as server:
        with GenerationClient(base_url=server.base_url, group_port=free_port(), connection_timeout=60) as client:
            client.init_communicator(device="cuda:2")
            outputs = {}
            for name in ("qwen2_b", "qwen2"):  # away and back: each push replaces every weight
                model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[name], dtype=torch.float32).to("cuda:2")
                client.update_model_params(model, bucket_bytes=128 * 1024)  # several buckets
                # n=2 over 7 prompts spreads the work over both engines.
                outputs[name] = client.generate(TEXT_PROMPTS, n=2, **GREEDY)["completion_ids"]
    assert references["qwen2_b"] != references["qwen2"]
    for name, got in outputs.items():
        assert got == [ids for ids in references[name] for _ in range(2)], name
