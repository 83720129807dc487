"""OnlineDPOTrainer: the reward of its own completions rises with a colocated engine and with a server."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from flywheel import OnlineDPOConfig, OnlineDPOTrainer
from flywheel.server.launch import CPU_ONLY_ENV, free_port, launch_server
from flywheel.trainer.judges import PairwiseJudge
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")


def dpo_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_new_tokens=10, beta=0.1,
        learning_rate=5e-3, max_steps=15, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return OnlineDPOConfig(**settings)


def train_and_check_scores_rise(model_path, args):
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 512})
    trainer = OnlineDPOTrainer(model=model_path, reward_funcs=lowercase_fraction, args=args, train_dataset=dataset)
    try:
        trainer.train()
    finally:
        trainer.rollout.close()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    assert len(scores) == args.max_steps
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert last > first + 0.12, f"reward did not rise: {[round(s, 3) for s in scores]}"
    logged = trainer.state.log_history[-2]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "objective/kl", "objective/scores_margin", "completions/mean_length",
                "time/generation", "time/reward", "time/train", "time/weight_sync"):
        assert key in logged, key
    assert logged["objective/scores_margin"] >= 0  # chosen is the higher-scored completion of each pair
    return trainer


def test_scores_rise_with_a_colocated_engine(tiny_checkpoints, tmp_path):
    args = dpo_args(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_kv_cache_memory_gb=0.05)
    trainer = train_and_check_scores_rise(tiny_checkpoints["qwen2"], args)
    assert trainer.rollout.synced_version == trainer.state.global_step - 1  # pushed before every generation


def test_scores_rise_with_a_server(tiny_checkpoints, tmp_path):
    with launch_server(tiny_checkpoints["qwen2"], log_path=tmp_path / "server.log", kv_cache_memory_gb=0.05,
                       env=CPU_ONLY_ENV, log_level="warning") as server:
        args = dpo_args(tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=server.base_url,
                        vllm_group_port=free_port())
        train_and_check_scores_rise(tiny_checkpoints["qwen2"], args)


class FirstIsBetter(PairwiseJudge):
    def __init__(self):
        self.calls = []

    def judge(self, prompts, completions, shuffle_order=True):
        self.calls.append((list(prompts), [list(pair) for pair in completions]))
        return [0] * len(prompts)


def test_a_pairwise_judge_reads_conversations_as_trl_renders_them(tiny_checkpoints, tmp_path):
    judge = FirstIsBetter()
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "Sure:"}] for i in range(4)]
    args = dpo_args(tmp_path, per_device_train_batch_size=2, max_steps=2, loss_type="ipo")
    trainer = OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], judge=judge, args=args,
                               train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    assert len(judge.calls) == 2
    rendered_prompts = {f"System: Be brief.\n\nUser: hi {i}\n\n" for i in range(4)}
    for call_prompts, pairs in judge.calls:
        assert len(call_prompts) == 2 and set(call_prompts) <= rendered_prompts
        # The final assistant message begins the completion the judge reads.
        assert all(len(pair) == 2 and all(completion.startswith("Assistant: Sure:") and completion.endswith("\n\n")
                                          for completion in pair) for pair in pairs)
    assert "objective/scores" not in trainer.state.log_history[-2]  # a judge gives ranks, not scores


def summed_logps_by_hand(model, token_ids, completion_length, temperature):
    """Σ log p of the last `completion_length` tokens of one unpadded sequence, from a plain forward."""
    logits = model(input_ids=torch.tensor([token_ids])).logits[0, -completion_length - 1 : -1].float()
    logps = F.log_softmax(logits / temperature, dim=-1)
    return logps.gather(-1, torch.tensor(token_ids[-completion_length:])[:, None]).sum()


def test_max_length_scores_completions_after_the_last_prompt_tokens_that_fit(tiny_checkpoints, tmp_path):
    prompts = ["Count to ten, slowly.", "Hi"]
    max_length = 12
    args = dpo_args(tmp_path, per_device_train_batch_size=2, max_new_tokens=4, max_length=max_length, beta=0.5)
    trainer = OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], ref_model=tiny_checkpoints["qwen2_b"],
                               judge=FirstIsBetter(), args=args, train_dataset=Dataset.from_dict({"prompt": prompts}))
    inputs = trainer._prepare_inputs([{"prompt": prompt} for prompt in prompts])
    loss = trainer.compute_loss(trainer.model, inputs)
    trainer.rollout.close()

    width = inputs["completion_ids"].size(1)
    assert inputs["prompt_ids"].size(1) == max_length - width
    sums = {"kept": {"policy": [], "ref": []}, "whole": {"policy": [], "ref": []}}
    for row in range(4):  # the chosen (first) completions of both prompts, then the rejected ones
        prompt_ids = trainer.processing_class(prompts[row % 2], add_special_tokens=False)["input_ids"]
        completion = inputs["completion_ids"][row][inputs["completion_mask"][row].bool()].tolist()
        for name, model in (("policy", trainer.model), ("ref", trainer.ref_model)):
            with torch.no_grad():
                for span, kept in (("kept", prompt_ids[-(max_length - width):]), ("whole", prompt_ids)):
                    sums[span][name].append(summed_logps_by_hand(model, kept + completion, len(completion),
                                                                 args.temperature))

    def dpo_loss_by_hand(span):
        policy, ref = torch.stack(sums[span]["policy"]), torch.stack(sums[span]["ref"])
        margins = (policy[:2] - policy[2:]) - (ref[:2] - ref[2:])
        return -F.logsigmoid(args.beta * margins).mean()

    assert loss.item() == pytest.approx(dpo_loss_by_hand("kept").item(), abs=1e-5)
    assert abs(dpo_loss_by_hand("whole").item() - loss.item()) > 1e-3  # the cut prompt changes the loss


def test_exactly_one_ranker_is_required(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], args=dpo_args(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], judge=FirstIsBetter(), reward_funcs=lowercase_fraction,
                         args=dpo_args(tmp_path))


def test_an_undecided_judge_chooses_the_second_completion_as_trl(tiny_checkpoints, tmp_path):
    class Verdicts(PairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [0, 1, -1][: len(prompts)]

    args = dpo_args(tmp_path, per_device_train_batch_size=3, max_steps=1)
    trainer = OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], judge=Verdicts(), args=args,
                               train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    rows = [{"prompt": prompt} for prompt in ("a", "a", "b", "b", "c", "c")]
    first_wins, _ = trainer._rank(rows, trainer.generate([row["prompt"] for row in rows], "train"), "train")
    assert first_wins.tolist() == [True, False, False]
    trainer.rollout.close()
