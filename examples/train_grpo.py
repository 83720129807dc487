"""Train a causal LM with GRPO to write completions with many distinct characters.

The same program TRL users write, with `from flywheel import ...`. Every GRPOConfig field is a flag.

CPU, nothing downloaded (a tiny random model is written first):
    python examples/train_grpo.py --max_steps 20 --learning_rate 1e-2 --max_completion_length 16
Evaluated on held-out prompts every 5 steps, the checkpoint of the best eval reward kept:
    python examples/train_grpo.py --max_steps 20 --max_completion_length 16 --eval_strategy steps --eval_steps 5 \
        --save_steps 5 --metric_for_best_model reward --load_best_model_at_end
Colocated engine (generation inside the training process):
    python examples/train_grpo.py --use_vllm --vllm_mode colocate
A generation server on GPUs 0-3, training on GPUs 4-7:
    CUDA_VISIBLE_DEVICES=0,1,2,3 flywheel vllm-serve --model Qwen/Qwen2.5-7B --data-parallel-size 4 &
    CUDA_VISIBLE_DEVICES=4,5,6,7 accelerate launch examples/train_grpo.py --model Qwen/Qwen2.5-7B \
        --use_vllm --bf16 --gradient_checkpointing
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import HfArgumentParser

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.testing import write_tiny_checkpoint

TOPICS = ["the sea", "a city at night", "bread", "rain", "a violin", "mountains", "a library", "winter",
          "a market", "the moon", "trains", "a garden", "coffee", "a storm", "bicycles", "a lighthouse"]


@dataclass
class ScriptArguments:
    model: str | None = field(default=None, metadata={"help": "Model path or hub id; default: a tiny random model."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of the prompts held out for evaluation when --eval_strategy is not 'no'."})


def reward_num_unique_chars(completions, **kwargs):
    """More distinct characters, more reward."""
    return [len(set(completion)) for completion in completions]


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, GRPOConfig)).parse_args_into_dataclasses()
    model = script_args.model or str(write_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-qwen2-"), "qwen2"))
    dataset = Dataset.from_dict({"prompt": [f"Write one sentence about {topic}." for topic in TOPICS] * 16})
    eval_dataset = None
    if training_args.eval_strategy != "no":
        splits = dataset.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        dataset, eval_dataset = splits["train"], splits["test"]
    trainer = GRPOTrainer(model=model, args=training_args, reward_funcs=reward_num_unique_chars,
                          train_dataset=dataset, eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
