"""Make the demo's base model: a small Qwen2 that can add but often forgets to carry.

Reproducible: `python -m flywheel.demo.make_base_model` (seeded, one CPU thread, about 6 minutes)
writes `flywheel/demo/base_model/`. The warm-up is plain supervised next-token training from
random weights on additions whose written answers drop the carry from the units column in
`FORGET_CARRY_RATE` of the cases that have one ("37+48=75"). The model learns that habit: it adds
correctly without a carry, and with one it carries only sometimes, so its greedy answer is usually
wrong there while some of its samples are right. An exact-match reward teaches it to carry.
On the 1,000 held-out problems the shipped model scores 58.3% greedy, 70.8% per sample at
temperature 1, and 98.2% pass@8.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.demo.task import MAX_ANSWER_TOKENS, Problem, exact_match_reward, heldout_problems, train_problems
from flywheel.testing import byte_tokenizer, tiny_config

logger = logging.getLogger(__name__)

BASE_MODEL_DIR = Path(__file__).parent / "base_model"

FORGET_CARRY_RATE = 0.6

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=272,
    max_position_embeddings=64,
)


def warm_up_answer(problem: Problem, rng: random.Random) -> str:
    """The answer the warm-up data shows: right, or (at FORGET_CARRY_RATE) without the units carry."""
    needs_carry = problem.left % 10 + problem.right % 10 >= 10
    if needs_carry and rng.random() < FORGET_CARRY_RATE:
        return str(problem.left + problem.right - 10)
    return problem.answer


def encode_examples(
    problems: list[Problem], answers: list[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, ...]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (loss only on the answer and eos)."""
    prompts = [tokenizer.encode(problem.prompt) for problem in problems]
    answers = [tokenizer.encode(answer) + [tokenizer.eos_token_id] for answer in answers]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids = torch.full((len(problems), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(problems), length), dtype=torch.long)
    labels = torch.full((len(problems), length), -100)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
    return input_ids, attention_mask, labels


@torch.no_grad()
def sample_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean per-sample exact-match accuracy, pass@num_samples) with transformers `generate`."""
    tokenizer.padding_side = "left"
    batch = tokenizer([problem.prompt for problem in problems], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    output = model.generate(
        **batch,
        max_new_tokens=MAX_ANSWER_TOKENS,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [problem.answer for problem in problems for _ in range(num_samples)]
    correct = torch.tensor(exact_match_reward(texts, answers)).view(len(problems), num_samples)
    return correct.mean().item(), correct.max(dim=1).values.mean().item()


def warm_up(steps: int, batch_size: int, learning_rate: float, seed: int) -> PreTrainedModel:
    """A random-init Qwen2 trained for `steps` steps on additions outside the held-out set."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", **MODEL_SHAPE), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup_steps = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    problems = train_problems(steps * batch_size, seed=seed)
    answer_rng = random.Random(seed)
    answers = [warm_up_answer(problem, answer_rng) for problem in problems]
    heldout = heldout_problems(200)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        input_ids, attention_mask, labels = encode_examples(problems[batch], answers[batch], tokenizer)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            model.eval()
            greedy, _ = sample_accuracy(model, tokenizer, heldout)
            model.train()
            elapsed = time.perf_counter() - start
            logger.info("step %d loss %.3f held-out greedy %.2f (%.0fs)", step + 1, loss.item(), greedy, elapsed)
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output-dir", type=Path, default=BASE_MODEL_DIR, help="where to write the model")
    parser.add_argument("--steps", type=int, default=2000, help="warm-up steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    model = warm_up(args.steps, args.batch_size, args.learning_rate, args.seed)
    tokenizer = byte_tokenizer()
    heldout = heldout_problems()
    greedy, _ = sample_accuracy(model, tokenizer, heldout)
    sampled, pass_at_8 = sample_accuracy(model, tokenizer, heldout, num_samples=8, temperature=1.0)
    logger.info(
        "held-out (%d problems): greedy %.3f, sampled at temperature 1 %.3f, pass@8 %.3f",
        len(heldout), greedy, sampled, pass_at_8,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.output_dir)
    logger.info("wrote %s", args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
