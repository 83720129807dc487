"""`flywheel serve` options: both spellings, defaults that are safe, errors that say what to fix."""

from __future__ import annotations

import pytest

from flywheel.cli import main as flywheel_main
from flywheel.server.options import ServerOptions, parse_options


def test_underscore_and_dash_spellings_parse_the_same():
    dashes = parse_options(["--model", "m", "--tensor-parallel-size", "2", "--data-parallel-size", "3",
                            "--gpu-memory-utilization", "0.5", "--max-model-len", "512", "--enforce-eager"])
    underscores = parse_options(["--model", "m", "--tensor_parallel_size", "2", "--data_parallel_size", "3",
                                 "--gpu_memory_utilization", "0.5", "--max_model_len", "512", "--enforce_eager"])

    assert dashes == underscores
    assert (dashes.tensor_parallel_size, dashes.data_parallel_size, dashes.world_size) == (2, 3, 6)
    assert dashes.enforce_eager and dashes.max_model_len == 512


def test_defaults_listen_on_localhost_and_take_the_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_API_KEY", "from-env")
    options = parse_options(["--model", "m"])

    assert (options.host, options.port, options.api_key) == ("127.0.0.1", 8000, "from-env")
    assert parse_options(["--model", "m", "--api-key", "flag"]).api_key == "flag"


def test_trl_launch_options_parse():
    options = parse_options(["--model", "m", "--trust-remote-code", "--kv_cache_dtype", "auto",
                             "--vllm-model-impl", "vllm"])

    assert options.trust_remote_code and options.kv_cache_dtype == "auto" and options.vllm_model_impl == "vllm"


@pytest.mark.parametrize("argv,message", [
    (["--tensor-parallel-size", "0"], "tensor_parallel_size must be >= 1, got 0"),
    (["--gpu_memory_utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["--dtype", "int8"], "dtype must be auto, float32, bfloat16 or float16, got 'int8'"),
    (["--log-level", "loud"], "log_level must be one of"),
    (["--port", "70000"], "port must be in 0..65535, got 70000"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--kv-cache-dtype", "fp8"], "kv_cache_dtype must be auto (the cache holds the weights' dtype), got 'fp8'"),
    (["--vllm_model_impl", "transformers"], "vllm_model_impl must be vllm or auto"),
])
def test_bad_options_are_usage_errors_that_say_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flywheel_main(["serve", "--model", "m", *argv])

    error = capsys.readouterr().err.splitlines()[-1]  # argparse's usage lines come first
    assert exit_info.value.code == 2
    assert error.startswith("flywheel serve: error: ") and message in error


def test_options_built_in_code_raise_what_to_fix():
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        ServerOptions(model="m", dtype="int8")


def test_model_is_a_folder_or_a_hub_id(tmp_path, capsys):
    assert parse_options(["--model", str(tmp_path)]).model == str(tmp_path)
    assert parse_options(["--model", "Qwen/Qwen2.5-0.5B-Instruct"]).model == "Qwen/Qwen2.5-0.5B-Instruct"

    with pytest.raises(SystemExit) as exit_info:
        parse_options(["--model", "/nonexistent/path"])

    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "flywheel serve: error: argument --model: '/nonexistent/path' is neither a folder nor a Hugging Face hub id "
        "(org/name)")


@pytest.mark.parametrize("command", ["serve", "vllm-serve"])
def test_help_lists_the_options_with_their_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flywheel_main([command, "--help"])

    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--tensor_parallel_size", "--data_parallel_size", "--enable_prefix_caching", "--api_key"):
        assert option in help_text
    assert "Processes (GPUs) per engine" in help_text


def test_each_engine_gets_its_slice_of_the_visible_gpus(monkeypatch):
    from flywheel.server.workers import WorkerPool

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7,9")
    options = parse_options(["--model", "m", "--tensor-parallel-size", "2", "--data-parallel-size", "2"])
    assert WorkerPool(options)._device_slices() == ["3,5", "7,9"]

    too_many = parse_options(["--model", "m", "--tensor-parallel-size", "3", "--data-parallel-size", "2"])
    with pytest.raises(ValueError, match="6 GPUs are needed, but only 4"):
        WorkerPool(too_many)._device_slices()


def test_requests_that_leave_max_tokens_out_get_a_default_within_max_tokens_limit():
    from fastapi import HTTPException

    from flywheel.server.app import ServerState
    from flywheel.server.protocol import GenerateRequest

    state = ServerState(parse_options(["--model", "m", "--max_tokens_limit", "8"]), pool=None, tokenizer=None,
                        vocab_size=10)
    assert state.sampling_params(GenerateRequest(prompts=["x"]))["max_tokens"] == 8
    with pytest.raises(HTTPException, match="limit 8"):
        state.sampling_params(GenerateRequest(prompts=["x"], max_tokens=16))
    unlimited = ServerState(parse_options(["--model", "m"]), pool=None, tokenizer=None, vocab_size=10)
    assert unlimited.sampling_params(GenerateRequest(prompts=["x"]))["max_tokens"] == 16
