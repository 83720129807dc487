"""GRPOTrainer against a real `flywheel serve` subprocess: it learns, and the server gets the trained weights."""

import pytest
from accelerate import Accelerator
from datasets import Dataset

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.server.launch import CPU_ONLY_ENV, free_port, launch_server
from flywheel.server.options import DEFAULT_MAX_N
from flywheel.trainer.rollout import SamplingSettings, ServerRollout
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with launch_server(tiny_checkpoints["qwen2"], log_path=log_path, kv_cache_memory_gb=0.05,
                       env=CPU_ONLY_ENV, log_level="warning") as proc:
        yield proc.port


def test_reward_rises_and_server_gets_the_trained_weights(tiny_checkpoints, server, tmp_path):
    from test_grpo_engine import check_engine_has_trained_weights

    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=8,
        max_completion_length=10, learning_rate=1e-2, max_steps=12, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, use_vllm=True, vllm_mode="server",
        vllm_server_host="127.0.0.1", vllm_server_port=server, vllm_group_port=free_port(),
    )
    dataset = Dataset.from_dict({"prompt": ["Say:"] * 256})
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=dataset)
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, f"reward did not rise: {[round(r, 3) for r in rewards]}"
    logged = trainer.state.log_history[-2]
    assert logged["sampling/sampling_logp_difference/mean"] < 1e-3  # weights reached the server every step
    assert logged["time/weight_sync"] > 0
    check_engine_has_trained_weights(trainer, tiny_checkpoints["qwen2"])  # pushes again, after training
    trainer.rollout.close()


def test_the_first_rollout_samples_the_trained_weights(tiny_checkpoints, server, tmp_path):
    """The server may serve another checkpoint than the trainer loads: it gets the trainer's weights first."""
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=8, max_completion_length=6,
        max_steps=1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=server,
        vllm_group_port=free_port(),
    )
    # The trainer before this one in the process (the test above) left the server free when it finished.
    trainer = GRPOTrainer(model=tiny_checkpoints["qwen2_b"], reward_funcs=lowercase_fraction, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["Say:"] * 8}))
    trainer.train()
    [logged] = [entry for entry in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in entry]
    assert logged["sampling/sampling_logp_difference/mean"] < 1e-3
    assert trainer.rollout.client.group is None  # closed when training ended


def test_a_prompt_repeated_more_often_than_a_request_may_ask_is_asked_for_in_pieces(server):
    args = GRPOConfig(output_dir="unused", per_device_train_batch_size=8, max_completion_length=2, report_to="none",
                      use_cpu=True, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1",
                      vllm_server_port=server, vllm_group_port=free_port())
    rollout = ServerRollout(args, SamplingSettings.from_args(args), Accelerator(cpu=True))
    try:
        output = rollout.generate([[104, 105]] * (DEFAULT_MAX_N + 44))
    finally:
        rollout.close()
    assert len(output.completion_ids) == DEFAULT_MAX_N + 44
