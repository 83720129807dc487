"""`flywheel demo` in a shortened form, and the pieces of its task."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from flywheel.demo import cli
from flywheel.demo.make_base_model import BASE_MODEL_DIR, warm_up_answer
from flywheel.demo.task import NUM_HELDOUT, Problem, exact_match_reward, heldout_problems, train_problems


def test_exact_match_reward_accepts_only_the_sum():
    rewards = exact_match_reward(
        prompts=["37+48="] * 4, completions=["85", " 85 ", "75", "851"], completion_ids=[[]] * 4, answer=["85"] * 4
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_training_problems_never_include_heldout_ones():
    heldout = set(heldout_problems())
    assert len(heldout) == NUM_HELDOUT
    assert heldout.isdisjoint(train_problems(5000, seed=0))
    assert heldout_problems(10) == heldout_problems()[:10]


def test_warm_up_data_drops_only_the_units_carry():
    rng = random.Random(0)
    assert {warm_up_answer(Problem(12, 34), rng) for _ in range(50)} == {"46"}
    assert {warm_up_answer(Problem(37, 48), rng) for _ in range(50)} == {"85", "75"}


def test_shipped_base_model_is_a_small_qwen2():
    config = json.loads((BASE_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (BASE_MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20
    assert (BASE_MODEL_DIR / "tokenizer.json").exists()


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--max-steps", "--output-dir", "--seed"):
        assert option in help_text


def test_bad_option_value_says_what_to_fix(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--max-steps", "0"])
    assert "--max-steps must be >= 1" in capsys.readouterr().err


def test_short_demo_writes_real_numbers(tmp_path):
    output_dir = tmp_path / "demo"

    argv = ["--max-steps", "2", "--eval-problems", "16", "--output-dir", str(output_dir), "--seed", "1",
            "--report-to", "tensorboard"]
    threads = torch.get_num_threads()
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # the demo's single thread does not leak into the caller

    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [record for record in records if "reward" in record]
    assert [record["step"] for record in train_logs] == [1, 2]
    for record in train_logs:
        assert 0.0 <= record["reward"] <= 1.0
        assert math.isfinite(record["loss"])
        assert record["completions/mean_length"] >= 1
    results = json.loads((output_dir / "results.json").read_text())
    for phase in ("before", "after"):
        assert results[phase]["num_problems"] == 16
        for key in ("greedy", "sampled", "pass_at_k"):
            assert 0.0 <= results[phase][key] <= 1.0
        assert results[phase]["pass_at_k"] >= results[phase]["sampled"]
    assert results["wall_seconds"] > 0
    assert (output_dir / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "model" / "model.safetensors").exists()
    assert list((output_dir / "runs").glob("*/events.out.tfevents.*"))
