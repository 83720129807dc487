"""The DPO losses (sigmoid, ipo) and the pairwise judges, against references computed by hand."""

import math

import pytest
import torch

from flywheel import OnlineDPOConfig
from flywheel.trainer.judges import RewardFunctionJudge, RewardModelJudge
from flywheel.trainer.losses import dpo_loss

CHOSEN, REJECTED = [-10.0, -4.5, -7.25], [-12.0, -4.0, -7.0]
REF_CHOSEN, REF_REJECTED = [-11.0, -5.0, -6.0], [-11.5, -4.2, -7.5]
BETA = 0.2


def hand_margins():
    return [(c - r) - (rc - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def run(loss_type):
    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=BETA, loss_type=loss_type)


def test_sigmoid_loss_matches_hand_computation():
    losses, chosen_rewards, rejected_rewards = run("sigmoid")
    expected = [math.log(1 + math.exp(-BETA * h)) for h in hand_margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-9)
    assert chosen_rewards.tolist() == pytest.approx([BETA * (c - rc) for c, rc in zip(CHOSEN, REF_CHOSEN)])
    assert rejected_rewards.tolist() == pytest.approx([BETA * (r - rr) for r, rr in zip(REJECTED, REF_REJECTED)])


def test_ipo_loss_matches_hand_computation():
    losses, _, _ = run("ipo")
    expected = [(h - 1 / (2 * BETA)) ** 2 for h in hand_margins()]
    assert losses.tolist() == pytest.approx(expected, abs=1e-9)


def test_sigmoid_gradient_favours_the_chosen_completion():
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    losses, _, _ = dpo_loss(chosen, torch.tensor(REJECTED), torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED),
                            beta=BETA)
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # descending the loss raises every chosen logp


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="sigmoid"):
        run("hinge")


def test_reward_function_judge_picks_the_higher_weighted_score():
    def count_a(completions, **kwargs):
        return [c.count("a") for c in completions]

    def length(completions, **kwargs):
        return [len(c) for c in completions]

    judge = RewardFunctionJudge([count_a, length], reward_weights=[1.0, -0.5])
    # scores: "aa" 2 - 1 = 1 vs "bbbb" 0 - 2 = -2 -> 0 ; "b" -0.5 vs "aaa" 3 - 1.5 = 1.5 -> 1
    assert judge.judge(["p", "q"], [["aa", "bbbb"], ["b", "aaa"]]) == [0, 1]


def test_reward_model_judge_ranks_by_the_model_score(tiny_checkpoints):
    judge = RewardModelJudge(tiny_checkpoints["qwen2"])
    scorer = judge.reward_funcs[0]
    completions = [["abc", "xyz!"], ["hello", "h"]]
    scores = scorer(prompts=["p", "p", "q", "q"], completions=[c for pair in completions for c in pair])
    expected = [0 if scores[0] >= scores[1] else 1, 0 if scores[2] >= scores[3] else 1]
    assert judge.judge(["p", "q"], completions) == expected


def test_config_beta_per_epoch_alias_and_errors(tmp_path):
    args = OnlineDPOConfig(output_dir=str(tmp_path), beta=[0.1, 0.05], max_new_tokens=12, report_to="none")
    assert args.max_completion_length == 12
    assert (args.beta_at(0.5), args.beta_at(1.2), args.beta_at(7.0)) == (0.1, 0.05, 0.05)
    assert OnlineDPOConfig(output_dir=str(tmp_path), beta=0.3, report_to="none").beta_at(3) == 0.3
    with pytest.raises(ValueError, match="loss_type"):
        OnlineDPOConfig(output_dir=str(tmp_path), loss_type="hinge", report_to="none")
    with pytest.raises(ValueError, match="beta"):
        OnlineDPOConfig(output_dir=str(tmp_path), beta=0.0, report_to="none")


def test_config_follows_trl_defaults_and_refuses_a_max_length_without_room_for_the_prompt(tmp_path):
    args = OnlineDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert (args.temperature, args.max_length) == (0.9, 512)
    assert OnlineDPOConfig(output_dir=str(tmp_path), max_length=None, max_new_tokens=600, report_to="none")
    with pytest.raises(ValueError, match="raise max_length, lower max_completion_length"):
        OnlineDPOConfig(output_dir=str(tmp_path), max_length=64, max_new_tokens=64, report_to="none")
