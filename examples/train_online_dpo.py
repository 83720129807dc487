"""Train a causal LM with Online DPO: two completions per prompt, the one a reward prefers is chosen.

Every OnlineDPOConfig field is a flag. Rank with reward functions (below), a reward model
(`--reward_model PATH`), or write a `flywheel.trainer.judges.PairwiseJudge`.

CPU, nothing downloaded (a tiny random model is written first):
    python examples/train_online_dpo.py --max_steps 20 --learning_rate 5e-3 --max_new_tokens 16
Colocated engine:
    python examples/train_online_dpo.py --use_vllm --vllm_mode colocate
A generation server:
    CUDA_VISIBLE_DEVICES=0 flywheel vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct &
    CUDA_VISIBLE_DEVICES=1 python examples/train_online_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --use_vllm --bf16
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser

from flywheel import OnlineDPOConfig, OnlineDPOTrainer
from flywheel.testing import write_tiny_checkpoint
from flywheel.trainer.rewards import char_fraction_reward

QUESTIONS = ["What is a river?", "Describe a cat.", "Why is the sky blue?", "Name a fruit.", "What is music?",
             "Describe your morning.", "What is a map?", "Why do birds sing?"]


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "Model path or hub id; default: a tiny random model."})
    reward_model: str | None = field(default=None, metadata={"help": "Rank with this reward model instead."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of the prompts held out for evaluation when --eval_strategy is not 'no'."})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, OnlineDPOConfig)).parse_args_into_dataclasses()
    model = script_args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-qwen2-"), "qwen2"))
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS] * 32
    ranker = (dict(reward_model=script_args.reward_model) if script_args.reward_model else
              dict(reward_funcs=char_fraction_reward("aeiou", name="vowel_fraction")))
    dataset = Dataset.from_dict({"prompt": conversations})
    eval_dataset = None
    if training_args.eval_strategy != "no":
        splits = dataset.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        dataset, eval_dataset = splits["train"], splits["test"]
    trainer = OnlineDPOTrainer(model=model, args=training_args, train_dataset=dataset,
                               eval_dataset=eval_dataset, **ranker)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
