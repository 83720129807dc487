"""Prefix caching and copy-on-write: a prompt's n completions prefill it once; repeats hit the cache."""

from conftest import hf_greedy
from flywheel import LLM, SamplingParams
from flywheel.engine.kv_cache import BlockManager
from flywheel.engine.sequence import Sequence

PROMPT = list(range(40, 77))  # 37 tokens: two full blocks of 16 and a partial one


def test_n_completions_prefill_the_prompt_once(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    [output] = llm.generate([PROMPT], SamplingParams(n=8, max_tokens=10, seed=3, ignore_eos=True))
    assert llm.engine.stats.prefill_tokens == len(PROMPT)
    assert [c.index for c in output.outputs] == list(range(8))
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1  # independent samples
    assert all(len(c.token_ids) == 10 for c in output.outputs)


def test_shared_blocks_are_copied_before_writing(tiny_checkpoints, hf_models):
    # Greedy copies of one prompt must all equal transformers: a write into a shared block would
    # corrupt the others' cache.
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    [output] = llm.generate([PROMPT], SamplingParams(n=4, temperature=0.0, max_tokens=20, ignore_eos=True))
    expected = hf_greedy(hf_models["qwen2"], PROMPT, 20)
    assert all(c.token_ids == expected for c in output.outputs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_groups_of_different_sizes_beside_a_lone_sequence_match_transformers(tiny_checkpoints, hf_models):
    # One decode batch: three rows sharing two blocks, two rows sharing four, and a row sharing none.
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    prompts = [PROMPT, list(range(120, 190)), list(range(200, 221))]
    params = [SamplingParams(n=n, temperature=0.0, max_tokens=20, ignore_eos=True) for n in (3, 2, 1)]
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        expected = hf_greedy(hf_models["qwen2"], prompt, 20)
        assert [c.token_ids for c in output.outputs] == [expected] * len(output.outputs)


def test_repeated_prompt_hits_the_prefix_cache(tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32")
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = llm.generate([PROMPT], greedy)[0].outputs[0].token_ids
    prefill_before = llm.engine.stats.prefill_tokens
    second = llm.generate([PROMPT + [1, 2]], greedy)[0].outputs[0].token_ids
    assert llm.engine.stats.prefix_cache_hit_tokens == 32  # the two full blocks
    assert llm.engine.stats.prefill_tokens - prefill_before == len(PROMPT) + 2 - 32
    assert first == hf_greedy(hf_models["qwen2"], PROMPT, 8)
    assert second == hf_greedy(hf_models["qwen2"], PROMPT + [1, 2], 8)

    llm.reset_prefix_cache()
    llm.generate([PROMPT], greedy)
    assert llm.engine.stats.prefix_cache_hit_tokens == 32


def test_a_prompt_of_whole_cached_blocks_recomputes_its_last_block_elsewhere(tiny_checkpoints):
    """Its last token is recomputed: written into the cached block, it would change the keys and values
    that a running sequence reads (as vLLM, hits stop before the last token)."""
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    engine, prompt = llm.engine, list(range(40, 48))  # two whole blocks
    engine.add_request("running", prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    engine.step()
    [running] = engine.requests["running"].seqs
    cached = running.block_table[1]
    before = [layer[cached].clone() for cache in engine.runner.kv_caches for layer in cache]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    after = [layer[cached] for cache in engine.runner.kv_caches for layer in cache]
    assert all(a.equal(b) for a, b in zip(after, before))
    assert engine.stats.prefix_cache_hit_tokens == 4  # the first block; the second holds the last token


def test_prefix_caching_can_be_disabled(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate([PROMPT], greedy)
    llm.generate([PROMPT], greedy)
    assert llm.engine.stats.prefix_cache_hit_tokens == 0


def test_prefix_cache_reset_forgets_every_hashed_block():
    manager = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    seqs = []
    for first in (10, 20, 30):
        seq = Sequence("r", 0, list(range(first, first + 13)), SamplingParams(), None)
        manager.allocate(seq)
        seq.num_cached_tokens = len(seq)
        manager.register_computed_blocks(seq)
        seqs.append(seq)
    manager.free(seqs[0])  # freed blocks keep their hashes until handed out again
    manager.allocate(Sequence("other", 0, [1] * 9, SamplingParams(), None))  # takes some of them
    hashed = {block.block_id for block in manager.blocks if block.hash is not None}
    assert hashed == manager.hashed_block_ids and len(hashed) > 0
    manager.reset_prefix_cache()
    assert all(block.hash is None and block.token_ids == [] for block in manager.blocks)
    assert not manager.hash_to_block_id and not manager.hashed_block_ids
    again = Sequence("again", 0, list(range(20, 33)), SamplingParams(), None)
    assert manager.can_allocate(again)
    manager.allocate(again)
    assert again.num_cached_tokens == 0  # no hit after the reset


def test_blocks_filled_across_a_weight_update_are_never_shared(tiny_checkpoints, hf_models):
    """A request running while the weights change holds keys and values of both models: none of its
    blocks may be hashed afterwards, not even a first block that fills up after the update."""
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    engine, prompt = llm.engine, [7, 8]  # shorter than a block: no block is hashed at its prefill
    engine.add_request("across", prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.step()
    llm.load_weights(hf_models["qwen2_b"].named_parameters())
    finished = []
    while engine.has_unfinished_requests():
        finished += [output for output in engine.step() if output.finished]
    assert not engine.block_manager.hashed_block_ids
    # The same tokens again: with the first block shared, its stale keys and values would be read.
    again = prompt + finished[0].outputs[0].token_ids
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    [after] = llm.generate([again], greedy)
    assert engine.stats.prefix_cache_hit_tokens == 0
    [expected] = LLM(tiny_checkpoints["qwen2_b"], dtype="float32").generate([again], greedy)
    assert after.outputs[0].token_ids == expected.outputs[0].token_ids
