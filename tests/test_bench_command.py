"""`flywheel bench NAME`: the benchmark scripts of bench/, run from a checkout."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flywheel(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_the_runnable_scripts_and_an_unknown_name_is_refused():
    listed = flywheel("--help")
    assert listed.returncode == 0
    names = listed.stdout.split("benchmarks: ")[1].strip().split(", ")
    assert "grpo_step" in names and "throughput" in names and "shapes" not in names  # shapes is a helper module
    unknown = flywheel("nope")
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr


def test_a_benchmark_runs_with_its_options(tmp_path):
    run = flywheel("grpo_step", "--model-shape", "tiny", "--device", "cpu", "--prompts", "2", "--num-generations", "2",
                   "--max-completion-length", "4", "--micro-batch", "4", "--steps", "1", "--modes", "none",
                   "--out", str(tmp_path / "grpo_step.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "GRPO step: tiny on cpu" in run.stdout and (tmp_path / "grpo_step.json").exists()


def test_outside_a_checkout_it_says_where_the_benchmarks_are(tmp_path):
    outside = flywheel("--help", cwd=tmp_path)
    assert outside.returncode == 2 and "checkout" in outside.stderr
