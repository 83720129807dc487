"""Greedy completions of the engine equal transformers `generate`, token for token (float32)."""

import pytest
import torch
from tokenizers import processors

from conftest import hf_greedy
from flywheel import LLM, SamplingParams
from flywheel.testing import byte_tokenizer, write_tiny_checkpoint

MIXED_PROMPTS = [[5, 6, 7], list(range(20, 57)), [9] * 16, list(range(100, 117)), [42]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama"])
def test_greedy_matches_transformers(architecture, tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints[architecture], dtype="float32")
    outputs = llm.generate(MIXED_PROMPTS, GREEDY)
    for prompt, output in zip(MIXED_PROMPTS, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(hf_models[architecture], prompt, 24)
        assert output.outputs[0].finish_reason == "length"


def test_greedy_matches_transformers_under_preemption(tiny_checkpoints, hf_models):
    # 24 blocks of 4 tokens cannot hold five sequences of up to 61 tokens: decoding must preempt.
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=96)
    outputs = llm.generate(MIXED_PROMPTS, GREEDY)
    assert llm.engine.stats.preemptions > 0
    for prompt, output in zip(MIXED_PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_models["qwen2"], prompt, 24)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_attention_biases_of_llama_and_qwen3_match_transformers(architecture, tmp_path):
    """With attention_bias, transformers gives o_proj a bias as well as q, k and v."""
    from transformers import AutoModelForCausalLM

    path = write_tiny_checkpoint(tmp_path / architecture, architecture, seed=4, attention_bias=True)
    llm = LLM(str(path), dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for prompt, output in zip(MIXED_PROMPTS, llm.generate(MIXED_PROMPTS, GREEDY)):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, 24)


def test_sliding_window_attention_is_refused(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "windowed", "qwen2", use_sliding_window=True, sliding_window=8,
                                 max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_attention.* is not supported"):
        LLM(str(path), dtype="float32")


def test_text_prompts_and_chat(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    [by_text] = llm.generate("hello", GREEDY)
    [by_ids] = llm.generate([list(b"hello")], GREEDY)
    assert by_text.prompt_token_ids == list(b"hello")
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_ids.outputs[0].token_ids, skip_special_tokens=True)

    conversation = [{"role": "user", "content": "hi"}]
    [chat] = llm.chat(conversation, GREEDY)
    expected = llm.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert chat.prompt == expected
    assert len(llm.chat([conversation, conversation], GREEDY)) == 2


def test_text_prompts_take_the_tokenizers_bos_and_chat_adds_none(tmp_path):
    """As vLLM: written text is encoded with the tokenizer's special tokens; a chat template carries its own."""
    path = write_tiny_checkpoint(tmp_path / "llama", "llama", seed=2)
    tokenizer = byte_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tokenizer.save_pretrained(path)
    llm = LLM(str(path), dtype="float32")
    [by_text] = llm.generate("hi", SamplingParams(max_tokens=1))
    assert by_text.prompt_token_ids == [bos, *b"hi"]
    conversation = [{"role": "user", "content": "hi"}]
    [chat] = llm.chat(conversation, SamplingParams(max_tokens=1))
    assert chat.prompt_token_ids == tokenizer.encode(chat.prompt, add_special_tokens=False)


def test_tensor_parallel_matches_single_rank(tiny_checkpoints):
    # On the CPU (Gloo) wherever it runs: two GPUs are test_gpu_parallel's.
    single = LLM(tiny_checkpoints["qwen2"], dtype="float32", device="cpu")
    sharded = LLM(tiny_checkpoints["qwen2"], dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        expected = [o.outputs[0].token_ids for o in single.generate(MIXED_PROMPTS, GREEDY)]
        got = [o.outputs[0].token_ids for o in sharded.generate(MIXED_PROMPTS, GREEDY)]
        assert got == expected
        [one] = sharded.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
        [ref] = single.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
        got_lp = [next(iter(e.values())).logprob for e in one.outputs[0].logprobs]
        ref_lp = [next(iter(e.values())).logprob for e in ref.outputs[0].logprobs]
        assert torch.allclose(torch.tensor(got_lp), torch.tensor(ref_lp), atol=1e-5)
    finally:
        sharded.shutdown()
