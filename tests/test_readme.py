"""The examples of README.md, run as written, with a tiny local model in place of the hub ids."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.server.launch import ServerProcess

README = (Path(__file__).parent.parent / "README.md").read_text()
HUB_IDS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def localized(code: str, model: str) -> str:
    for hub_id in HUB_IDS:
        code = code.replace(hub_id, model)
    return code


def run_python(code: str, cwd: Path) -> None:
    script = cwd / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def python_block(containing: str) -> str:
    [code] = [code for code in blocks("python") if containing in code]
    return code


def test_readme_gives_the_two_commands():
    indented = [line.strip() for line in README.splitlines() if line.startswith("    python3 -m pip install")]
    assert indented[0].endswith("flywheel demo")
    assert indented[1].endswith("python3 -m pytest -q")


@pytest.mark.parametrize("marker", ["llm.generate(", "vllm_mode=\"colocate\", num_generations", "OnlineDPOTrainer("])
def test_offline_and_colocated_examples_run(marker, tiny_checkpoints, tmp_path):
    run_python(localized(python_block(marker), tiny_checkpoints["qwen2"]), tmp_path)


def test_server_workflow_runs(tiny_checkpoints, tmp_path):
    serve_line = next(line for line in blocks("bash")[0].splitlines() if "vllm-serve" in line)
    words = shlex.split(localized(serve_line, tiny_checkpoints["qwen2"]))
    assert words[:2] == ["CUDA_VISIBLE_DEVICES=0,1,2,3", "flywheel"] and words[2] == "vllm-serve"
    options = dict(zip(words[3::2], words[4::2]))
    model = options.pop("--model")
    server = ServerProcess(model, log_path=tmp_path / "server.log",
                           **{name.removeprefix("--"): value for name, value in options.items()})
    try:
        server.wait_ready()
        # train.py as the README writes it; only the server's port differs (the README's is 8000).
        train = localized(python_block("my_test"), tiny_checkpoints["qwen2"])
        train = train.replace("use_vllm=True,", f"use_vllm=True, vllm_server_port={server.port},")
        run_python(train, tmp_path)
    finally:
        server.stop()
