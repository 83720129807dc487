"""GRPOTrainer with the engine colocated in the training process: it learns, and the engine gets its weights."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.trainer.logprobs import completion_logps
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")
COLOCATE = dict(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_memory_gb=0.05)


def colocate_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=8,
        max_completion_length=10, learning_rate=1e-2, max_steps=12, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, **COLOCATE,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def engine_vs_trainer_logps(trainer, prompt_ids):
    """Sample one completion with the trainer's placement; its logprobs from the engine and from the model."""
    output = trainer.rollout.generate([prompt_ids])
    device = trainer.accelerator.device
    completion = torch.tensor([output.completion_ids[0]], device=device)

    def score(model):
        with torch.no_grad():
            logps, _ = completion_logps(model, torch.tensor([prompt_ids], device=device),
                                        torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                                        completion, torch.ones_like(completion), temperature=trainer.args.temperature)
        return logps[0]

    return torch.tensor(output.logprobs[0]), score


def check_engine_has_trained_weights(trainer, initial_path):
    """After a final sync, the engine's logprobs equal the trained model's and differ from the initial model's."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.rollout.sync_weights(model, trainer.state.global_step)
    assert not trainer.rollout.sync_weights(model, trainer.state.global_step)  # unchanged: nothing pushed
    trainer.rollout.wake_up()
    prompt_ids = trainer.processing_class("Say:", add_special_tokens=False)["input_ids"]
    engine_logps, score = engine_vs_trainer_logps(trainer, prompt_ids)
    trained = score(model.eval()).cpu()
    initial = score(AutoModelForCausalLM.from_pretrained(initial_path).to(trainer.accelerator.device)).cpu()
    torch.testing.assert_close(engine_logps, trained, atol=2e-4, rtol=0)
    assert (engine_logps - initial).abs().max() > 0.1


def test_reward_rises_and_engine_gets_the_trained_weights(tiny_checkpoints, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 256})
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          args=colocate_args(tmp_path), train_dataset=dataset)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, f"reward did not rise: {[round(r, 3) for r in rewards]}"
    logged = trainer.state.log_history[-2]
    assert logged["sampling/sampling_logp_difference/mean"] < 1e-3
    assert logged["sampling/importance_sampling_ratio/max"] <= trainer.args.vllm_importance_sampling_cap
    assert logged["time/weight_sync"] > 0
    check_engine_has_trained_weights(trainer, tiny_checkpoints["qwen2"])


def test_colocated_engine_batches_a_whole_rollout_and_sleeps_when_asked(tiny_checkpoints, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 8})
    args = colocate_args(tmp_path, steps_per_generation=20, vllm_enable_sleep_mode=True)
    assert args.completions_per_rollout == 16 * 20
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=dataset)
    engine = trainer.rollout.llm.engine
    assert engine.config.max_num_seqs == 320  # the 320 completions of one generation run as one batch
    assert engine.sleeping and engine.runner.kv_caches == []
    trainer.rollout.wake_up()
    assert not engine.sleeping
    trainer.rollout.close()


def test_colocated_rollout_takes_generation_kwargs_over_its_fields(tiny_checkpoints, tmp_path):
    args = colocate_args(tmp_path, generation_kwargs={"max_tokens": 3, "top_k": 1})
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 8}))
    try:
        completions = trainer.rollout.generate([[72, 105]] * 4).completion_ids
    finally:
        trainer.rollout.close()
    assert all(len(ids) == 3 for ids in completions) and len({tuple(ids) for ids in completions}) == 1


def test_on_policy_loss_takes_old_logprobs_and_importance_weights_from_its_own_forward(tiny_checkpoints, tmp_path):
    """With no optimizer step inside a generation there is no separate old-policy pass, and the loss and
    its gradient are those computed with old logprobs and importance weights from such a pass."""
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          args=colocate_args(tmp_path, max_steps=1), train_dataset=Dataset.from_dict({"prompt": ["a"]}))
    assert not trainer.needs_old_logps
    model = trainer.model.train()
    batch = trainer._prepare_inputs([{"prompt": "Say:"}] * 16)
    assert "old_logps" not in batch and "importance_weights" not in batch
    # An engine further from the trainer than the real one, so that the weights matter (some are capped).
    noise = torch.randn(batch["sampling_logps"].shape, generator=torch.Generator().manual_seed(0))
    batch["sampling_logps"] = batch["sampling_logps"] + 0.5 * noise * batch["completion_mask"]

    def loss_and_grads(inputs):
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), [param.grad.clone() for param in model.parameters()]

    loss, grads = loss_and_grads(batch)
    assert trainer.metrics.summary("train", 1)["sampling/importance_sampling_ratio/max"] == 2.0
    with torch.no_grad():
        old_logps = trainer._logps(model, batch)
    weights = torch.exp(old_logps - batch["sampling_logps"]).clamp(max=trainer.args.vllm_importance_sampling_cap)
    expected_loss, expected_grads = loss_and_grads({**batch, "old_logps": old_logps, "importance_weights": weights})
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    trainer.rollout.close()
