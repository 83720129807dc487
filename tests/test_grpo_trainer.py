"""GRPOTrainer with transformers `generate` (use_vllm=False): it learns, and its inputs reach the rewards."""

import math
import threading

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.trainer import online_trainer
from flywheel.trainer.gc_freeze import FreezeAfterFirstStep
from flywheel.trainer.logprobs import completion_logps
from flywheel.trainer.losses import grpo_loss
from flywheel.trainer.prompts import decode_completions
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")


def learning_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=8,
        max_completion_length=10, learning_rate=1e-2, max_steps=12, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def rewards_by_step(trainer):
    return [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]


def assert_reward_rises(rewards, margin=0.25):
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + margin, f"reward did not rise: {[round(r, 3) for r in rewards]}"


def test_reward_rises_with_transformers_generate(tiny_checkpoints, tmp_path):
    torch.manual_seed(0)
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 256})
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          args=learning_args(tmp_path), train_dataset=dataset)
    trainer.train()
    rewards = rewards_by_step(trainer)
    assert len(rewards) == 12
    assert_reward_rises(rewards)
    assert any(isinstance(callback, FreezeAfterFirstStep) and callback.frozen
               for callback in trainer.callback_handler.callbacks)
    last = trainer.state.log_history[-2]
    for key in ("reward_std", "rewards/lowercase_fraction/mean", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
                "time/generation", "time/reward", "time/train", "time/weight_sync"):
        assert key in last, key
    lengths = [last["completions/min_length"], last["completions/mean_length"], last["completions/max_length"]]
    assert 1 <= lengths[0] <= lengths[1] <= lengths[2] <= 10
    # num_tokens is the running total of prompt and completion tokens, 16 rows of one prompt a step.
    logs = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    totals = [0] + [entry["num_tokens"] for entry in logs]
    prompt_tokens = {round(totals[i + 1] - totals[i] - 16 * entry["completions/mean_length"], 6)
                     for i, entry in enumerate(logs)}
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() % 16 == 0
    assert totals[-1] == trainer.state.num_input_tokens_seen


def test_conversational_prompts_columns_none_rewards_and_a_reward_model(tiny_checkpoints, tmp_path):
    seen = {}

    def echo_target(prompts, completions, completion_ids, target, **kwargs):
        seen["prompt"], seen["completion"], seen["target"] = prompts[0], completions[0], target
        seen["ids"] = completion_ids[0]
        # Abstain on every other completion: those rows count only the other functions.
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    dataset = Dataset.from_dict({"prompt": prompts, "target": [f"t{i}" for i in range(8)]})
    args = learning_args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=2, beta=0.1,
                         loss_type="grpo", reward_weights=[1.0, 0.5], max_prompt_length=12,
                         log_completions=True, num_completions_to_print=2, mask_truncated_completions=True)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=[echo_target, tiny_checkpoints["qwen2_b"]],
                          args=args, train_dataset=dataset)
    trainer.train()

    assert isinstance(seen["prompt"], list) and seen["prompt"][0]["role"] == "user"
    assert seen["completion"][0]["role"] == "assistant"
    assert trainer.processing_class.decode(seen["ids"], skip_special_tokens=True) == seen["completion"][0]["content"]
    assert len(seen["target"]) == 8 and all(t.startswith("t") for t in seen["target"])
    logged = trainer.state.log_history[-2]
    assert logged["rewards/echo_target/mean"] == 1.0  # the None rewards were skipped, not averaged in as 0
    assert "rewards/qwen2_b/mean" in logged
    assert logged["kl"] >= 0.0


def test_a_prompt_ending_with_an_assistant_message_is_continued_and_rewarded_as_in_trl(tiny_checkpoints, tmp_path):
    """The policy continues the message; reward functions get the prompt without it and a completion starting with it."""
    seen = {}

    def record(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [0.0] * len(completions)

    prompt = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}]
    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=1)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=record, args=args,
                          train_dataset=Dataset.from_dict({"prompt": [prompt] * 4}))
    trainer.train()
    assert seen["prompt"] == prompt[:1]
    assert seen["completion"][0]["content"].startswith("It is")


def test_model_object_and_its_tokenizer_are_accepted(tiny_checkpoints, tmp_path):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["qwen2"])
    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=1,
                         gradient_accumulation_steps=2, num_iterations=2)
    dataset = Dataset.from_dict({"prompt": ["a", "b", "c", "d"]})
    trainer = GRPOTrainer(model=model, reward_funcs=lowercase_fraction, args=args, train_dataset=dataset,
                          eval_dataset=dataset, processing_class=tokenizer)
    assert trainer.needs_old_logps  # num_iterations > 1 trains off-policy after the first update
    trainer.train()
    assert trainer.state.global_step == 1
    assert "eval_loss" in trainer.evaluate()
    assert {"eval_reward", "eval_completions/mean_length", "eval_time/generation"} <= set(trainer.state.log_history[-1])


def test_log_completions_prints_the_last_generation_at_each_log(tiny_checkpoints, tmp_path, capsys):
    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=2,
                         log_completions=True, num_completions_to_print=3)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 8}))
    trainer.train()
    printed = capsys.readouterr().out
    for step in (0, 1):
        assert f"completions at step {step} (3 of 4):" in printed
    assert printed.count("    prompt: 'Say:'") == 6
    assert printed.count("| lowercase_fraction ") == 6


def test_each_evaluation_logs_its_own_generations_under_its_prefix(tiny_checkpoints, tmp_path):
    def reward_by_prompt(prompts, **kwargs):
        return [100.0 if prompt.startswith("T") else 0.0 for prompt in prompts]

    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=1,
                         per_device_eval_batch_size=4)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=reward_by_prompt, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c", "d"]}),
                          eval_dataset=Dataset.from_dict({"prompt": ["E"]}))
    trainer.train()
    trainer.evaluate(eval_dataset=Dataset.from_dict({"prompt": ["T"]}), metric_key_prefix="test")
    assert trainer.state.log_history[-1]["test_reward"] == 100.0
    trainer.evaluate()
    assert trainer.state.log_history[-1]["eval_reward"] == 0.0
    assert trainer.predict(Dataset.from_dict({"prompt": ["T"]})).metrics["test_reward"] == 100.0
    trainer.evaluate()
    assert trainer.state.log_history[-1]["eval_reward"] == 0.0


def test_evaluate_returns_its_generation_metrics_so_the_best_checkpoint_can_be_chosen_by_reward(
        tiny_checkpoints, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["a", "b", "c", "d"]})
    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=2,
                         per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                         save_steps=1, metric_for_best_model="eval_reward", greater_is_better=True,
                         load_best_model_at_end=True)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    assert trainer.state.best_metric == max(entry["eval_reward"] for entry in trainer.state.log_history
                                            if "eval_reward" in entry)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_reward", "eval_completions/mean_length", "eval_time/generation"} <= set(metrics)
    assert trainer.state.log_history[-1]["eval_reward"] == metrics["eval_reward"]


def test_evaluation_samples_num_generations_eval_completions_per_prompt(tiny_checkpoints, tmp_path):
    def by_position(completions, **kwargs):
        return [1.0, 0.0, 3.0, 3.0][:len(completions)]

    eval_dataset = Dataset.from_dict({"prompt": ["a", "b"]})
    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, num_generations_eval=2,
                         per_device_eval_batch_size=4, max_steps=1)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=by_position, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}), eval_dataset=eval_dataset)
    rows = next(iter(trainer.get_eval_dataloader()))
    assert [row["prompt"] for row in rows] == ["a", "a", "b", "b"]
    trainer.model.eval()
    advantages = trainer._prepare_inputs(rows)["advantages"]()
    # Groups of two: (1, 0) with std √0.5, and (3, 3).
    half = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert advantages.tolist() == pytest.approx([half, -half, 0.0, 0.0], abs=1e-6)
    assert "eval_loss" in trainer.evaluate()


def test_normalize_then_sum_gives_each_reward_function_its_own_group_scale(tiny_checkpoints, tmp_path):
    def small(completions, **kwargs):
        return [0.0, 1.0, 0.0, 1.0]

    def large(completions, **kwargs):
        return [0.0, 0.0, 100.0, 0.0]

    args = learning_args(tmp_path, per_device_train_batch_size=4, num_generations=4, max_steps=1,
                         multi_objective_aggregation="normalize_then_sum")
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=[small, large], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}))
    advantages = trainer._prepare_inputs([{"prompt": "a"}] * 4)["advantages"]()
    # small: mean 0.5, std √(1/3); large: mean 25, std 50. Their normalised sum is then normalised over the four.
    small_z = [(r - 0.5) / (math.sqrt(1 / 3) + 1e-4) for r in (0.0, 1.0, 0.0, 1.0)]
    large_z = [(r - 25.0) / (50.0 + 1e-4) for r in (0.0, 0.0, 100.0, 0.0)]
    totals = [a + b for a, b in zip(small_z, large_z)]
    mean = sum(totals) / 4
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / 3)
    assert advantages.tolist() == pytest.approx([(t - mean) / (std + 1e-4) for t in totals], abs=1e-5)
    trainer.train()
    assert trainer.state.global_step == 1


def test_off_policy_masking_drops_negative_completions_the_policy_drifted_from(tiny_checkpoints, tmp_path):
    """A sampler far from the policy (π_sampling > π everywhere) masks every negative-advantage completion: the
    loss is the one whose negative advantages are 0."""
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          args=learning_args(tmp_path, per_device_train_batch_size=8, max_steps=1,
                                             off_policy_mask_threshold=0.5),
                          train_dataset=Dataset.from_dict({"prompt": ["a"]}))
    model = trainer.model.train()
    batch = trainer._prepare_inputs([{"prompt": "Say:"}] * 8)
    advantages = batch["advantages"]()
    assert (advantages < 0).any() and (advantages > 0).any()
    with torch.no_grad():
        logps = trainer._logps(model, batch)
    masked = trainer.compute_loss(model, {**batch, "sampling_logps": logps + 1.0})
    kept = trainer.compute_loss(model, {**batch, "sampling_logps": logps + 0.4})
    trainer.args.off_policy_mask_threshold = None
    expected = trainer.compute_loss(model, {**batch, "advantages": lambda: advantages.clamp(min=0)})
    plain = trainer.compute_loss(model, batch)
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(kept, plain, atol=1e-6, rtol=0)


def test_use_bias_correction_kl_changes_the_kl_gradient_as_the_loss_function_does(tiny_checkpoints, tmp_path):
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          args=learning_args(tmp_path, per_device_train_batch_size=8, max_steps=1, beta=0.5),
                          train_dataset=Dataset.from_dict({"prompt": ["a"]}))
    assert trainer.args.use_bias_correction_kl
    model = trainer.model.train()
    batch = trainer._prepare_inputs([{"prompt": "Say:"}] * 8)
    batch["ref_logps"] = batch["ref_logps"] - 0.3 * batch["completion_mask"]  # a reference to be away from

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return [param.grad.clone() for param in model.parameters()]

    def expected_gradients(corrected):
        logps, _ = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                    batch["completion_mask"], temperature=trainer.args.temperature)
        loss, _ = grpo_loss(logps, logps.detach(), batch["advantages"](), batch["loss_mask"], loss_type="dapo",
                            epsilon_low=0.2, epsilon_high=0.2, beta=0.5, ref_logps=batch["ref_logps"],
                            kl_bias_correction=corrected, num_items_in_batch=batch["tokens_per_micro_batch"])
        return gradients(loss)

    corrected = gradients(trainer.compute_loss(model, batch))
    trainer.args.use_bias_correction_kl = False
    plain = gradients(trainer.compute_loss(model, batch))
    for grad, expected in zip(corrected, expected_gradients(True), strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    for grad, expected in zip(plain, expected_gradients(False), strict=True):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(corrected, plain, strict=True))


def test_rewards_are_computed_after_the_first_training_forward_is_launched(tiny_checkpoints, tmp_path,
                                                                          monkeypatch):
    events, decoding_threads = [], []

    def counting_reward(prompts, completions, **kwargs):
        events.append("reward")
        return lowercase_fraction(completions=completions, **kwargs)

    def recorded_decode(*args):
        decoding_threads.append(threading.current_thread())
        return decode_completions(*args)

    monkeypatch.setattr(online_trainer, "decode_completions", recorded_decode)

    args = learning_args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_steps=2,
                         gradient_accumulation_steps=2)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=counting_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c", "d"] * 4}))
    trainer.model.register_forward_hook(lambda *_: events.append("forward") if trainer.model.training else None)
    trainer.train()
    # Per optimizer step, one generation of 16 completions, scored once: after the first micro-batch's forward
    # (on the CPU a micro-batch is two forwards: each prompt once, then its completions).
    micro_batch = ["forward", "forward"]
    assert events == (micro_batch + ["reward"] + micro_batch) * 2, events
    assert all(entry["time/reward"] > 0 for entry in trainer.state.log_history if "time/reward" in entry)
    # The completions were decoded beside the main thread, once per generation.
    assert len(decoding_threads) == 2 and threading.main_thread() not in decoding_threads


def test_gspo_with_two_sided_clipping_learns_off_policy(tiny_checkpoints, tmp_path):
    # Each generation trains two micro-steps, each its own optimizer step: the second is off-policy.
    args = learning_args(tmp_path, per_device_train_batch_size=8, steps_per_generation=2, loss_type="grpo",
                         importance_sampling_level="sequence", delta=1.5, max_steps=16)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 64}))
    assert trainer.needs_old_logps
    trainer.train()
    assert_reward_rises(rewards_by_step(trainer))
    clipped = [entry["clip_ratio/region_mean"] for entry in trainer.state.log_history
               if "clip_ratio/region_mean" in entry]
    assert all(0.0 <= value <= 1.0 for value in clipped)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_makes_the_training_forward_repeatable(tiny_checkpoints, tmp_path, disable):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"], attention_dropout=0.5)
    GRPOTrainer(model=model, reward_funcs=lowercase_fraction, train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
                args=learning_args(tmp_path, disable_dropout=disable))
    model.train()
    input_ids = torch.arange(1, 30)[None]
    assert torch.equal(model(input_ids).logits, model(input_ids).logits) == disable


@pytest.mark.parametrize(("quantile", "kept"), [
    (0.5, [[0, 0, 0, 1], [1, 1, 1, 0]]),
    (0.0, [[0, 0, 0, 0], [0, 0, 1, 0]]),
    (1.0, [[1, 1, 1, 1], [1, 1, 1, 0]]),
])
def test_top_entropy_quantile_keeps_the_highest_entropy_tokens(tiny_checkpoints, tmp_path, quantile, kept):
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}),
                          args=learning_args(tmp_path, top_entropy_quantile=quantile, max_steps=1))
    # Seven real tokens with entropies 1..7 (the padding's 9 would rank first).
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert trainer._high_entropy_mask(entropy, mask).long().tolist() == kept
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize(("sync_steps", "mixed"), [(1, True), (2, False)])
def test_sync_ref_model_mixes_the_policy_into_the_reference(tiny_checkpoints, tmp_path, sync_steps, mixed):
    args = learning_args(tmp_path, beta=0.04, sync_ref_model=True, ref_model_mixup_alpha=0.25,
                         ref_model_sync_steps=sync_steps, max_steps=1)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 16}))
    before = {name: p.detach().clone() for name, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, ref_parameter in trainer.ref_model.named_parameters():
        expected = 0.25 * policy[name] + 0.75 * before[name] if mixed else before[name]
        torch.testing.assert_close(ref_parameter, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(policy["model.norm.weight"], before["model.norm.weight"])  # the policy did move


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(per_device_train_batch_size=6, num_generations=4), "divisible by num_generations"),
        (dict(num_generations=1), "num_generations must be >= 2"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(scale_rewards="std"), "scale_rewards"),
        (dict(vllm_mode="remote"), "vllm_mode"),
        (dict(generation_batch_size=16, steps_per_generation=2), "not both"),
        (dict(generation_batch_size=12), "multiple of per_device_train_batch_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(beta=-0.1), "beta"),
        (dict(delta=1.0), "delta must be > 1"),
        (dict(importance_sampling_level="group"), "importance_sampling_level"),
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
        (dict(vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode"),
        (dict(sync_ref_model=True), "set beta > 0"),
        (dict(beta=0.1, ref_model_mixup_alpha=0.0), "ref_model_mixup_alpha"),
        (dict(generation_kwargs={"n": 2}), "generation_kwargs cannot set n"),
        (dict(repetition_penalty=1e-9), "repetition_penalty must be in"),
        (dict(num_generations_eval=0), "num_generations_eval must be >= 1"),
        (dict(eval_strategy="steps", per_device_eval_batch_size=4, num_generations_eval=3),
         "divisible by num_generations_eval"),
        (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation must be one of"),
        (dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="batch"),
         "scale_rewards 'batch' does not apply"),
        (dict(vllm_importance_sampling_cap=3.0, vllm_importance_sampling_clip_max=2.5), "two names of one bound"),
        (dict(vllm_importance_sampling_clip_max=0.0), "vllm_importance_sampling_clip_max must be > 0"),
        (dict(vllm_importance_sampling_clip_min=-0.1), "vllm_importance_sampling_clip_min must be >= 0"),
        (dict(vllm_importance_sampling_clip_max=None), "both None"),
        (dict(vllm_importance_sampling_clip_min=2.0), "must be below"),
        (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold must be > 0"),
    ],
)
def test_invalid_configs_fail_at_construction(tmp_path, overrides, message):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none")
    settings.update(overrides)
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**settings)


def test_config_resolves_generation_batch_and_keeps_trl_names(tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                      num_generations=8, scale_rewards=False, report_to="none")
    assert (args.steps_per_generation, args.generation_batch_size) == (4, 16)
    assert args.scale_rewards == "none" and args.epsilon_high == args.epsilon
    disabled = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, top_k=None, min_p=None,
                          report_to="none")
    assert (disabled.top_k, disabled.min_p) == (0, 0.0)
    assert args.remove_unused_columns is False
    from dataclasses import fields

    helps = {f.name: f.metadata.get("help") for f in fields(GRPOConfig)}
    for name in ("num_generations", "generation_batch_size", "steps_per_generation", "max_prompt_length",
                 "max_completion_length", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "generation_kwargs", "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host",
                 "vllm_server_port", "vllm_server_timeout", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                 "vllm_importance_sampling_correction", "vllm_importance_sampling_cap", "beta", "num_iterations",
                 "epsilon", "epsilon_high", "loss_type", "scale_rewards", "reward_weights",
                 "mask_truncated_completions", "log_completions", "importance_sampling_level", "delta",
                 "disable_dropout", "top_entropy_quantile", "sync_ref_model", "ref_model_mixup_alpha",
                 "ref_model_sync_steps", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                 "vllm_importance_sampling_clip_min", "off_policy_mask_threshold", "use_bias_correction_kl",
                 "multi_objective_aggregation", "num_generations_eval"):
        assert helps.get(name), name
    assert (args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max) == (None, 2.0)
    assert args.use_bias_correction_kl and args.multi_objective_aggregation == "sum_then_normalize"
    assert args.num_generations_eval == 8 and args.off_policy_mask_threshold is None


@pytest.mark.parametrize(("given", "clip_max"), [
    ({}, 2.0),
    ({"vllm_importance_sampling_cap": 3.0}, 3.0),
    ({"vllm_importance_sampling_clip_max": 2.5}, 2.5),
    ({"vllm_importance_sampling_cap": 2.5, "vllm_importance_sampling_clip_max": 2.5}, 2.5),
    ({"vllm_importance_sampling_clip_max": None, "vllm_importance_sampling_clip_min": 0.5}, None),
])
def test_vllm_importance_sampling_cap_is_the_older_name_of_clip_max(tmp_path, given, clip_max):
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", **given)
    assert args.vllm_importance_sampling_clip_max == clip_max
    assert args.vllm_importance_sampling_cap == clip_max


@pytest.mark.parametrize(
    ("accumulation", "steps_per_generation", "num_iterations", "policy_moves"),
    [
        (4, 4, 1, False),  # one generation per optimizer step
        (4, 2, 1, False),  # two generations per optimizer step
        (4, 2, 2, False),  # both iterations of a generation within one optimizer step
        (4, 4, 2, True),  # the second iteration follows an optimizer step
        (4, 8, 1, True),  # a generation spans two optimizer steps
        (4, 3, 1, True),  # generations straddle optimizer steps
    ],
)
def test_old_logprobs_get_their_own_pass_only_when_the_policy_moves_within_a_generation(
        tiny_checkpoints, tmp_path, accumulation, steps_per_generation, num_iterations, policy_moves):
    args = learning_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=accumulation,
                         steps_per_generation=steps_per_generation, num_iterations=num_iterations)
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}))
    assert trainer.needs_old_logps == policy_moves


def test_mixed_precision_keeps_autocast_but_not_a_float32_copy_of_the_logits(tiny_checkpoints, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 16})
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, train_dataset=dataset,
                          args=learning_args(tmp_path, max_steps=1, bf16=True, use_cpu=True))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16  # autocast still on: a float32 model, bfloat16 products
