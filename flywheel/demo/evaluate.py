"""Held-out accuracy of a checkpoint on the demo task, generated through flywheel's engine."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel import LLM, SamplingParams
from flywheel.demo.task import MAX_ANSWER_TOKENS, Problem, exact_match_reward

NUM_SAMPLES = 8


@dataclass
class Accuracy:
    """Exact-match accuracy on held-out problems: greedy, per sample at temperature 1, and pass@k."""

    greedy: float
    sampled: float
    pass_at_k: float
    num_problems: int
    k: int = NUM_SAMPLES


def heldout_accuracy(model_path: str, problems: list[Problem], seed: int = 0) -> Accuracy:
    """Answer every problem greedily and `NUM_SAMPLES` times at temperature 1 with the engine on the CPU."""
    llm = LLM(model=model_path, dtype="float32", device="cpu", seed=seed, kv_cache_memory_gb=0.1)
    prompts = [problem.prompt for problem in problems]
    greedy_outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_ANSWER_TOKENS))
    sampling = SamplingParams(n=NUM_SAMPLES, temperature=1.0, max_tokens=MAX_ANSWER_TOKENS)
    sampled_outputs = llm.generate(prompts, sampling)
    answers = [problem.answer for problem in problems]
    greedy_correct = exact_match_reward([output.outputs[0].text for output in greedy_outputs], answers)
    sampled_correct = [
        exact_match_reward([completion.text for completion in output.outputs], [answer] * NUM_SAMPLES)
        for output, answer in zip(sampled_outputs, answers)
    ]
    return Accuracy(
        greedy=sum(greedy_correct) / len(problems),
        sampled=sum(map(sum, sampled_correct)) / (len(problems) * NUM_SAMPLES),
        pass_at_k=sum(map(max, sampled_correct)) / len(problems),
        num_problems=len(problems),
    )
