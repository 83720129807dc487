"""GRPO on a GPU in bf16 mixed precision: transformers generate and the colocated engine both learn."""

import pytest
from datasets import Dataset

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.trainer.prompt_packing import PACKED_ATTENTION
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")


@pytest.mark.gpu
@pytest.mark.parametrize("placement", [{}, dict(pack_prompts=True),
                                       dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2)])
def test_reward_rises_on_gpu_in_bf16(tiny_checkpoints, tmp_path, placement):
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=8,
        max_completion_length=10, learning_rate=1e-2, max_steps=12, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, bf16=True, **placement,
    )
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 256}))
    try:
        trainer.train()
    finally:
        trainer.rollout.close()
    # Packed: a micro-batch trained as one flat sequence, each prompt once.
    assert (trainer.model.config._attn_implementation == PACKED_ATTENTION) == args.pack_prompts
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, [round(r, 3) for r in rewards]
    logged = trainer.state.log_history[-2]
    if args.use_vllm:
        # bf16 engine vs bf16-autocast trainer: close, not equal.
        assert logged["sampling/sampling_logp_difference/mean"] < 0.05
