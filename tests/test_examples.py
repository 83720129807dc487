"""The example scripts, run as from the command line on their tiny default model: evaluation and resuming."""

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(monkeypatch, script: str, *flags: str) -> None:
    monkeypatch.setattr(sys, "argv", [script, "--report_to", "none", "--disable_tqdm", "true", *flags])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


@pytest.mark.parametrize("script, length_flag", [("train_grpo.py", "--max_completion_length"),
                                                 ("train_online_dpo.py", "--max_new_tokens")])
def test_an_example_evaluates_on_held_out_prompts_and_resumes_from_its_checkpoint(monkeypatch, tmp_path, script,
                                                                                  length_flag):
    out = tmp_path / "out"
    common = ("--output_dir", str(out), length_flag, "4", "--per_device_train_batch_size", "8",
              "--per_device_eval_batch_size", "24", "--eval_fraction", "0.01", "--logging_steps", "1")
    run_example(monkeypatch, script, *common, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
                "--save_steps", "2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])

    run_example(monkeypatch, script, *common, "--max_steps", "3", "--save_steps", "1",
                "--resume_from_checkpoint", str(out / "checkpoint-2"))
    # Resumed at step 2: a fresh start would have saved checkpoint-1 as well.
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
