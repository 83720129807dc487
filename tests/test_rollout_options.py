"""TRL's rollout options on the shared trainer arguments: chat template arguments, the colocated engine's
context window, checkpoints with their own modeling code, and a float32 language-modeling head."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, HfArgumentParser

from flywheel import GRPOConfig, GRPOTrainer
from flywheel.testing import CHAT_TEMPLATE, byte_tokenizer, write_tiny_checkpoint
from flywheel.trainer.logprobs import completion_logps, float32_lm_head
from flywheel.trainer.online_trainer import from_pretrained_kwargs
from flywheel.trainer.rewards import char_fraction_reward

lowercase_fraction = char_fraction_reward("abcdefghijklmnopqrstuvwxyz", name="lowercase_fraction")
THINKING_TEMPLATE = CHAT_TEMPLATE + "{% if enable_thinking %}{{ 'THINK' }}{% endif %}"
COLOCATE = dict(use_vllm=True, vllm_mode="colocate", vllm_kv_cache_memory_gb=0.05)


def grpo_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def grpo_trainer(model, args, reward_funcs=lowercase_fraction, **kwargs):
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                       train_dataset=Dataset.from_dict({"prompt": ["a"] * 4}), **kwargs)


@pytest.mark.parametrize("placement", [{}, COLOCATE], ids=["transformers", "colocate"])
def test_chat_template_kwargs_reach_the_template_of_the_prompts_the_trainer_generates_from(
        tiny_checkpoints, tmp_path, placement):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    conversation = [{"role": "user", "content": "2+2?"}]

    def rendered_prompt(**options):
        trainer = grpo_trainer(tiny_checkpoints["qwen2"], grpo_args(tmp_path, **placement, **options),
                               processing_class=tokenizer)
        try:
            generated = trainer.generate([conversation] * 2, "eval")
        finally:
            trainer.rollout.close()
        assert len(generated.completion_ids) == 2
        return tokenizer.decode(generated.prompt_ids[0])

    assert rendered_prompt(chat_template_kwargs={"enable_thinking": True}).endswith("<|im_start|>assistant\nTHINK")
    assert rendered_prompt().endswith("<|im_start|>assistant\n")


def test_dict_options_arrive_as_json_text_from_the_command_line(tmp_path):
    [args] = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--report_to", "none",
        "--chat_template_kwargs", json.dumps({"enable_thinking": False}),
        "--vllm_max_model_length", "2048", "--trust_remote_code", "--cast_lm_head_to_fp32",
    ])
    assert args.chat_template_kwargs == {"enable_thinking": False}
    assert args.vllm_max_model_length == 2048 and args.trust_remote_code and args.cast_lm_head_to_fp32


def test_the_colocated_engine_gets_vllm_max_model_length(tiny_checkpoints, tmp_path):
    def engine_context(**options):
        trainer = grpo_trainer(tiny_checkpoints["qwen2"], grpo_args(tmp_path, max_prompt_length=100, **COLOCATE,
                                                                    **options))
        trainer.rollout.close()
        return trainer.rollout.llm.engine.max_model_len

    assert engine_context(vllm_max_model_length=200) == 200
    assert engine_context() == 100 + 4  # by default a prompt and a completion at their longest


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        (dict(max_prompt_length=100, max_completion_length=50, vllm_max_model_length=120), "raise it to 150 or more"),
        (dict(max_prompt_length=None, max_completion_length=64, vllm_max_model_length=64), "raise it to 65 or more"),
    ],
)
def test_a_context_window_without_room_for_a_prompt_and_its_completion_is_refused(tmp_path, lengths, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", **lengths)


def test_model_init_kwargs_take_precedence_over_trust_remote_code():
    assert from_pretrained_kwargs(None, trust_remote_code=True) == {"dtype": "auto", "trust_remote_code": True}
    assert from_pretrained_kwargs({"trust_remote_code": False, "dtype": "float32"}, trust_remote_code=True) == {
        "dtype": "float32", "trust_remote_code": False}
    assert from_pretrained_kwargs({"trust_remote_code": True}) == {"dtype": "auto", "trust_remote_code": True}


@pytest.fixture(scope="module")
def checkpoint_with_its_own_code(tmp_path_factory):
    """A tiny qwen2 checkpoint whose config names modeling code in its own directory (`auto_map`)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("remote_code") / "tiny", "qwen2", seed=0)
    (path / "configuration_tiny.py").write_text(
        "from transformers import Qwen2Config\n\n\nclass TinyConfig(Qwen2Config):\n    model_type = 'tiny_own_code'\n")
    (path / "modeling_tiny.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n\n\n"
        "class TinyForCausalLM(Qwen2ForCausalLM):\n    config_class = TinyConfig\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny_own_code", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_trust_remote_code_loads_a_checkpoint_with_its_own_modeling_code(checkpoint_with_its_own_code, tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        grpo_trainer(checkpoint_with_its_own_code, grpo_args(tmp_path))
    trainer = grpo_trainer(checkpoint_with_its_own_code, grpo_args(tmp_path, trust_remote_code=True, beta=0.1))
    ref_model = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert type(trainer.model).__name__ == type(ref_model).__name__ == "TinyForCausalLM"
    trainer.train()
    assert trainer.state.global_step == 1


def bf16_scores(model, prompt_ids, completion_ids, **options):
    ones = torch.ones_like
    with torch.no_grad():
        logps, _ = completion_logps(model, prompt_ids, ones(prompt_ids), completion_ids, ones(completion_ids),
                                    **options)
    return logps


def test_a_float32_head_scores_with_float32_logits_of_the_bf16_hidden_states(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.bfloat16).eval()
    prompt_ids = torch.tensor([[72, 105, 33], [72, 105, 33], [1, 2, 3]])
    completion_ids = torch.tensor([[10, 20, 30, 40], [50, 60, 70, 80], [90, 100, 110, 120]])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
        logits = hidden[:, 2:-1].float() @ model.lm_head.weight.float().T
    by_hand = logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
    bf16_head = bf16_scores(model, prompt_ids, completion_ids, share_prompts=False)

    float32_lm_head(model)
    float32_head = bf16_scores(model, prompt_ids, completion_ids, share_prompts=False)
    torch.testing.assert_close(float32_head, by_hand, atol=1e-6, rtol=0)
    assert (bf16_head - by_hand).abs().max() > 1e-3
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate runs a bf16 model
        torch.testing.assert_close(model.lm_head(hidden[:, 2:-1]), logits, atol=0, rtol=0)


def test_cast_lm_head_to_fp32_trains_both_heads_in_float32_and_refuses_tied_embeddings(tiny_checkpoints, tmp_path):
    args = grpo_args(tmp_path, cast_lm_head_to_fp32=True, beta=0.1, model_init_kwargs={"dtype": "bfloat16"})
    trainer = grpo_trainer(tiny_checkpoints["llama"], args)
    trainer.train()
    ref_model = trainer.accelerator.unwrap_model(trainer.ref_model)
    for model in (trainer.model, ref_model):
        assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert trainer.model(input_ids=torch.tensor([[72, 105]])).logits.dtype == torch.float32
    with pytest.raises(ValueError, match="ties them to its input embeddings"):
        grpo_trainer(tiny_checkpoints["qwen2"], args)


def test_reward_models_from_a_path_load_the_tokenizer_code_they_ship_when_trusted(tiny_checkpoints, tmp_path):
    path = tmp_path / "reward"
    shutil.copytree(tiny_checkpoints["qwen2"], path)
    (path / "tokenization_marked.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass MarkedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_marked.MarkedTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    def reward_tokenizer(**options):
        trainer = grpo_trainer(tiny_checkpoints["qwen2"], grpo_args(tmp_path, **options),
                               reward_funcs=[lowercase_fraction, str(path)])
        return type(trainer.reward_funcs[1].tokenizer).__name__

    assert reward_tokenizer() != "MarkedTokenizer"
    assert reward_tokenizer(trust_remote_code=True) == "MarkedTokenizer"
