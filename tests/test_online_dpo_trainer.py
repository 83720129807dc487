"""OnlineDPOTrainer: the reward of its own completions rises with a colocated engine and with a server."""

import pytest
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


def test_a_pairwise_judge_ranks_conversational_pairs(tiny_checkpoints, tmp_path):
    judge = FirstIsBetter()
    prompts = [[{"role": "user", "content": f"hi {i}"}] for i in range(4)]
    args = dpo_args(tmp_path, per_device_train_batch_size=2, max_steps=2, loss_type="ipo")
    trainer = OnlineDPOTrainer(model=tiny_checkpoints["qwen2"], judge=judge, args=args,
                               train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    assert len(judge.calls) == 2
    call_prompts, pairs = judge.calls[0]
    assert len(call_prompts) == 2 and call_prompts[0][0]["role"] == "user"
    assert all(len(pair) == 2 and pair[0][0]["role"] == "assistant" for pair in pairs)
    assert "objective/scores" not in trainer.state.log_history[-2]  # a judge gives ranks, not scores


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
