"""Rollout plumbing: repeat runs, the repeat sampler, micro-batch splitting, generate's EOS cut, sync-once."""

from array import array

import torch
from transformers import AutoModelForCausalLM

from flywheel.trainer.batching import left_pad, right_pad, split_batch
from flywheel.trainer.prompts import prompt_runs
from flywheel.trainer.rollout import Rollout, RolloutOutput, SamplingSettings, TransformersRollout
from flywheel.trainer.sampler import RepeatSampler


def test_prompt_runs_group_consecutive_repeats():
    assert prompt_runs([[1], [1], [2, 3], [2, 3], [1]]) == [([1], 2), ([2, 3], 2), ([1], 1)]


def test_repeat_sampler_repeats_prompts_and_generation_batches():
    sampler = RepeatSampler(range(5), mini_repeat_count=2, batch_size=2, repeat_count=2, shuffle=False)
    # The fifth prompt does not fill a generation batch of 2 and is dropped.
    assert list(sampler) == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert len(sampler) == 16


def test_repeat_sampler_shuffles_identically_for_every_process():
    first = list(RepeatSampler(range(32), mini_repeat_count=4, batch_size=8, shuffle=True, seed=7))
    second = list(RepeatSampler(range(32), mini_repeat_count=4, batch_size=8, shuffle=True, seed=7))
    assert first == second and first != sorted(first)
    assert all(first[i] == first[i + 3] for i in range(0, len(first), 4))


def test_split_batch_trims_padding_per_micro_batch():
    prompt_ids, prompt_mask = left_pad([[5], [6, 7, 8], [9, 9], [4]], 0, "cpu")
    completion_ids, completion_mask = right_pad([[1, 2], [3], [4, 5, 6, 7], [8, 9, 10]], 0, "cpu")
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask, "advantages": torch.arange(4.0), "tokens_per_micro_batch": 3.0,
             "sampling_logps": completion_mask.float()}
    first, second = split_batch(batch, 2)
    assert first["prompt_ids"].tolist() == [[0, 0, 5], [6, 7, 8]]
    assert first["completion_ids"].tolist() == [[1, 2], [3, 0]]
    assert first["sampling_logps"].shape == (2, 2)
    assert second["prompt_ids"].tolist() == [[9, 9], [0, 4]]
    assert second["completion_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert second["advantages"].tolist() == [2.0, 3.0] and second["tokens_per_micro_batch"] == 3.0


def test_padding_keeps_each_dtype_and_takes_empty_rows():
    logps, mask = right_pad([[-0.5, -1.25], [], [-2.0]], 0.0, "cpu", dtype=torch.float32)
    assert logps.dtype == torch.float32 and logps.tolist() == [[-0.5, -1.25], [0.0, 0.0], [-2.0, 0.0]]
    assert mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    ids, _ = left_pad([[2**40, 7], [3]], -1, "cpu")
    assert ids.tolist() == [[2**40, 7], [-1, 3]]
    empty, empty_mask = right_pad([[], []], 0, "cpu")
    assert empty.shape == empty_mask.shape == (2, 0)
    halves, _ = right_pad([[0.5], [1.5, 2.5]], 0.0, "cpu", dtype=torch.bfloat16)
    assert halves.dtype == torch.bfloat16 and halves.tolist() == [[0.5, 0.0], [1.5, 2.5]]


def test_padding_takes_c_arrays_and_rows_repeated_by_reference():
    logps, mask = right_pad([array("d", [-0.5, -1.25]), array("d"), [-2.0]], 1.0, "cpu", dtype=torch.float64)
    assert logps.tolist() == [[-0.5, -1.25], [1.0, 1.0], [-2.0, 1.0]] and mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    narrowed, _ = right_pad([array("d", [0.25]), [0.5, 0.75]], 0.0, "cpu", dtype=torch.float32)
    assert narrowed.dtype == torch.float32 and narrowed.tolist() == [[0.25, 0.0], [0.5, 0.75]]
    group, other = [4, 5], [6]
    ids, mask = left_pad([group, group, other, group], 0, "cpu")
    assert ids.tolist() == [[4, 5], [4, 5], [0, 6], [4, 5]] and mask.tolist() == [[1, 1], [1, 1], [0, 1], [1, 1]]


def test_transformers_rollout_stops_at_eos_and_flags_truncation(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"]).train()
    torch.manual_seed(0)
    # With a quarter of the vocabulary counted as EOS, some completions stop early and some run to the limit.
    stop_ids = list(range(64))
    rollout = TransformersRollout(model, SamplingSettings(max_tokens=6), pad_token_id=256, eos_token_ids=stop_ids,
                                  device=torch.device("cpu"))
    output = rollout.generate([[72, 105]] * 32)
    assert model.training  # generate ran in eval mode and put the training mode back
    assert len(output.completion_ids) == 32 and output.logprobs is None
    for ids, truncated in zip(output.completion_ids, output.truncated):
        assert not set(ids[:-1]) & set(stop_ids)
        assert (len(ids) == 6 and ids[-1] not in stop_ids) if truncated else ids[-1] in stop_ids
    assert any(output.truncated) and not all(output.truncated)


class CountingRollout(Rollout):
    def __init__(self):
        super().__init__()
        self.pushes = 0

    def generate(self, prompt_ids):
        return RolloutOutput([[] for _ in prompt_ids], None, [True for _ in prompt_ids])

    def _push_weights(self, model):
        self.pushes += 1


def test_weights_are_pushed_only_when_the_version_changed():
    rollout = CountingRollout()
    model = torch.nn.Linear(2, 2)
    assert [rollout.sync_weights(model, v) for v in (0, 0, 1, 1, 1, 2)] == [True, False, True, False, False, True]
    assert rollout.pushes == 3


def test_transformers_rollout_ignores_the_checkpoints_generation_config(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    model.generation_config.top_k = 1  # greedy if generate fell back to it
    model.generation_config.repetition_penalty = 5.0
    rollout = TransformersRollout(model, SamplingSettings(max_tokens=4), pad_token_id=256, eos_token_ids=[258],
                                  device=torch.device("cpu"))
    torch.manual_seed(0)
    completions = rollout.generate([[72, 105]] * 16).completion_ids
    assert len({tuple(ids) for ids in completions}) > 1


def test_transformers_rollout_takes_generation_kwargs_over_its_fields(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    settings = SamplingSettings(max_tokens=8, generation_kwargs={"max_new_tokens": 2, "top_k": 1})
    rollout = TransformersRollout(model, settings, pad_token_id=256, eos_token_ids=[258], device=torch.device("cpu"))
    completions = rollout.generate([[72, 105]] * 4).completion_ids
    assert all(len(ids) == 2 for ids in completions) and len({tuple(ids) for ids in completions}) == 1
