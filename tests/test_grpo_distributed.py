"""GRPO under `accelerate launch --num_processes 2` (DDP over Gloo on the CPU), with a server or colocated engines."""

import json
import os
import subprocess
import sys
import textwrap

from flywheel.server.launch import CPU_ONLY_ENV, free_port, launch_server

TRAIN_SCRIPT = textwrap.dedent(
    """
    import atexit, json, os, sys
    import torch
    from datasets import Dataset
    from flywheel import GRPOConfig, GRPOTrainer
    from flywheel.trainer.rewards import char_fraction_reward

    model_path, out_dir, server_port, group_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    overrides = json.loads(sys.argv[5])
    torch.set_num_threads(1)

    @atexit.register  # registered before the trainer's exit hook, so it runs after that one
    def record_group_state():
        with open(f"{out_dir}/exit-{os.environ['RANK']}.json", "w") as f:
            json.dump({"group_destroyed": not torch.distributed.is_initialized()}, f)

    if server_port:
        placement = dict(vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=server_port,
                         vllm_group_port=group_port)
    else:
        placement = dict(vllm_mode="colocate", vllm_kv_cache_memory_gb=0.05)
    args = GRPOConfig(**{
        **dict(output_dir=out_dir, per_device_train_batch_size=8, num_generations=8, max_completion_length=10,
               learning_rate=1e-2, max_steps=12, logging_steps=1, report_to="none", save_strategy="no",
               disable_tqdm=True, seed=0, use_vllm=True, **placement),
        **overrides,
    })
    dataset = Dataset.from_dict({"prompt": [f"Say {i}:" for i in range(256)]})
    letters = char_fraction_reward("abcdefghijklmnopqrstuvwxyz")
    completions_seen = []

    def letters_recorded(prompts, completions, **kwargs):
        completions_seen.append(list(zip(prompts, completions)))
        return letters(prompts=prompts, completions=completions, **kwargs)

    trainer = GRPOTrainer(model=model_path, reward_funcs=letters_recorded, args=args, train_dataset=dataset)
    trainer.train()
    with open(f"{out_dir}/completions-{os.environ['RANK']}.json", "w") as f:
        json.dump(completions_seen, f)
    # Both replicas must hold the same weights after training (DDP averaged the gradients), and the same
    # reference model when there is one.
    models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    checksum = [sum(p.detach().double().sum().item() for p in model.parameters()) for model in models]
    checksums = trainer.accelerator.gather(torch.tensor([checksum], dtype=torch.float64)).tolist()
    if trainer.accelerator.is_main_process:
        rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump({"rewards": rewards, "checksums": checksums, "processes": trainer.accelerator.num_processes}, f)
    """
)


def launch_two_processes(model_path, tmp_path, server_port=0, **overrides):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port",
               str(free_port()), str(script), model_path, str(tmp_path), str(server_port), str(free_port()),
               json.dumps(overrides)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **CPU_ONLY_ENV})
    assert run.returncode == 0, run.stderr[-4000:]
    # The trainers destroy the Gloo group before the interpreter finalizes (see exit_teardown.py).
    for rank in range(2):
        assert json.loads((tmp_path / f"exit-{rank}.json").read_text()) == {"group_destroyed": True}
    return json.loads((tmp_path / "result.json").read_text())


def check_learned_with_identical_replicas(result):
    assert result["processes"] == 2
    for first_replica, second_replica in zip(*result["checksums"], strict=True):
        assert abs(first_replica - second_replica) < 1e-6
    rewards = result["rewards"]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, f"reward did not rise: {[round(r, 3) for r in rewards]}"


def test_two_processes_learn_with_a_server(tiny_checkpoints, tmp_path):
    with launch_server(tiny_checkpoints["qwen2"], log_path=tmp_path / "server.log", kv_cache_memory_gb=0.05,
                       env=CPU_ONLY_ENV, log_level="warning") as server:
        result = launch_two_processes(tiny_checkpoints["qwen2"], tmp_path, server.port)
    check_learned_with_identical_replicas(result)


def test_two_processes_learn_with_colocated_engines(tiny_checkpoints, tmp_path):
    check_learned_with_identical_replicas(launch_two_processes(tiny_checkpoints["qwen2"], tmp_path))


def test_two_processes_learn_with_gspo_an_entropy_mask_and_a_synced_reference(tiny_checkpoints, tmp_path):
    # The entropy threshold is taken over both processes' tokens; each reference follows its own replica.
    result = launch_two_processes(tiny_checkpoints["qwen2"], tmp_path, beta=0.04, sync_ref_model=True,
                                  ref_model_sync_steps=2, top_entropy_quantile=0.5,
                                  importance_sampling_level="sequence")
    check_learned_with_identical_replicas(result)
    assert len(result["checksums"][0]) == 2  # the policy and the reference


def test_two_processes_sample_different_completions_of_a_shared_prompt_with_transformers(tiny_checkpoints, tmp_path):
    # A group of 8 is split 4 + 4 over the processes: each half comes from its own process's generator.
    launch_two_processes(tiny_checkpoints["qwen2"], tmp_path, use_vllm=False, per_device_train_batch_size=4,
                         max_steps=2)
    first, second = (json.loads((tmp_path / f"completions-{rank}.json").read_text()) for rank in range(2))
    for step_first, step_second in zip(first, second, strict=True):
        assert {prompt for prompt, _ in step_first} == {prompt for prompt, _ in step_second}
        assert not {completion for _, completion in step_first} & {completion for _, completion in step_second}
