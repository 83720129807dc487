"""The GRPO loss of every loss_type, and the advantages, against references computed by hand."""

import math

import pytest
import torch

from flywheel.trainer.losses import grpo_loss, importance_sampling_weights, masked_extremes, off_policy_sequence_mask
from flywheel.trainer.rewards import (
    combine_rewards,
    compute_rewards,
    decoupled_group_advantages,
    group_advantages,
    group_std,
)

# Three completions of up to four tokens; the third has only two real tokens.
LOGPS = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -0.9], [-2.5, -0.2, -1.0, -1.0]]
OLD_LOGPS = [[-1.1, -0.9, -1.9, -0.1], [-0.1, -1.2, -1.5, -0.4], [-2.0, -0.25, -1.0, -1.0]]
REF_LOGPS = [[-1.2, -0.4, -2.2, -0.3], [-0.5, -1.0, -0.6, -1.1], [-2.3, -0.1, -1.0, -1.0]]
ADVANTAGES = [1.5, -0.8, 0.6]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
IS_WEIGHTS = [[1.0, 0.9, 1.2, 2.0], [0.5, 1.0, 1.1, 1.0], [1.3, 0.8, 1.0, 1.0]]
EPS_LOW, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.04, 6


def hand_ratio(i: int, t: int, level: str, logps=LOGPS, old=OLD_LOGPS, mask=MASK) -> float:
    """π / π_old of token t of completion i; at the sequence level, the exp of the row's mean log-ratio."""
    if level == "token":
        return math.exp(logps[i][t] - old[i][t])
    log_ratios = [a - b for a, b, m in zip(logps[i], old[i], mask[i]) if m]
    return math.exp(sum(log_ratios) / len(log_ratios))


def hand_token_losses(beta: float, with_is: bool, advantages=ADVANTAGES, logps=LOGPS, old=OLD_LOGPS, ref=REF_LOGPS,
                      weights=IS_WEIGHTS, level: str = "token", delta: float | None = None,
                      kept=None, kl_correction: bool = False) -> list[list[float]]:
    """Per-token loss, one token at a time, straight from the GRPO objective."""
    losses = []
    for i in range(len(logps)):
        row = []
        for t in range(len(logps[i])):
            ratio = hand_ratio(i, t, level, logps, old)
            clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
            capped = ratio if delta is None else min(ratio, delta)
            loss = -min(capped * advantages[i], clipped * advantages[i])
            if with_is:
                loss *= weights[i][t]
            if kept is not None:
                loss *= kept[i][t]
            if beta:
                r = ref[i][t] - logps[i][t]
                loss += beta * (math.exp(r) - r - 1) * (ratio if kl_correction else 1.0)
            row.append(loss)
        losses.append(row)
    return losses


def hand_loss(loss_type: str, beta: float = 0.0, with_is: bool = False, num_items: float | None = None,
              mask=MASK, **data) -> float:
    token_losses = hand_token_losses(beta, with_is, **data)
    masked_rows = [[l for l, m in zip(row, mask_row) if m] for row, mask_row in zip(token_losses, mask)]
    total = sum(sum(row) for row in masked_rows)
    num_tokens = sum(len(row) for row in masked_rows)
    rows = len(masked_rows)
    if loss_type == "grpo":
        return sum(sum(row) / len(row) for row in masked_rows) / rows
    if loss_type == "bnpo":
        return total / num_tokens
    if loss_type == "dr_grpo":
        return total / (rows * MAX_LEN)
    if loss_type == "dapo":
        return total / (num_items if num_items is not None else num_tokens)
    raise AssertionError(loss_type)


def run_loss(loss_type: str, beta: float = 0.0, with_is: bool = False, num_items: float | None = None,
             level: str = "token", delta: float | None = None):
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(
        logps, torch.tensor(OLD_LOGPS, dtype=torch.float64), torch.tensor(ADVANTAGES, dtype=torch.float64),
        torch.tensor(MASK), loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
        importance_sampling_level=level, delta=delta, beta=beta, ref_logps=torch.tensor(REF_LOGPS, dtype=torch.float64),
        importance_weights=torch.tensor(IS_WEIGHTS, dtype=torch.float64) if with_is else None,
        max_completion_length=MAX_LEN, num_items_in_batch=num_items,
    )
    return logps, loss, stats


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("with_is", [False, True])
def test_loss_matches_hand_computation(loss_type, beta, with_is):
    _, loss, stats = run_loss(loss_type, beta, with_is)
    assert loss.item() == pytest.approx(hand_loss(loss_type, beta, with_is), abs=1e-6)
    assert ("kl" in stats) == (beta > 0)


def test_dapo_normalises_by_the_given_token_count():
    _, loss, _ = run_loss("dapo", num_items=20.0)
    assert loss.item() == pytest.approx(hand_loss("dapo", num_items=20.0), abs=1e-6)


def test_kl_statistic_is_the_masked_mean_of_k3():
    _, _, stats = run_loss("grpo", beta=BETA)
    values = [
        math.exp(REF_LOGPS[i][t] - LOGPS[i][t]) - (REF_LOGPS[i][t] - LOGPS[i][t]) - 1
        for i in range(3) for t in range(4) if MASK[i][t]
    ]
    assert stats["kl"].item() == pytest.approx(sum(values) / len(values), abs=1e-9)


def test_clipped_tokens_get_no_gradient_and_clip_ratios_count_them():
    logps, loss, stats = run_loss("bnpo")
    loss.backward()
    # Row 0 token 1: ratio e^0.4 = 1.49 > 1.28 with A > 0 -> clipped high.
    # Row 1 token 3 is masked; row 1 token 0: ratio e^-0.2 = 0.82 (inside) ; token 2: e^0.8 with A < 0 -> not clipped.
    assert logps.grad[0, 1].item() == 0.0
    assert logps.grad[0, 0].item() != 0.0
    assert logps.grad[1, 3].item() == 0.0  # masked
    ratios = [[math.exp(a - b) for a, b in zip(r, o)] for r, o in zip(LOGPS, OLD_LOGPS)]
    high = [ratios[i][t] > 1 + EPS_HIGH and ADVANTAGES[i] > 0 for i in range(3) for t in range(4) if MASK[i][t]]
    low = [ratios[i][t] < 1 - EPS_LOW and ADVANTAGES[i] < 0 for i in range(3) for t in range(4) if MASK[i][t]]
    assert sum(high) >= 1
    assert stats["clip_ratio/high"].item() == pytest.approx(sum(high) / len(high))
    assert stats["clip_ratio/low"].item() == pytest.approx(sum(low) / len(low))


def test_on_policy_grpo_gradient_is_the_advantage_weighted_score():
    # With old = logps, ratio = 1 and the gradient w.r.t. each token's logp is -A / (tokens of its row) / B.
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK),
                        loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    loss.backward()
    for i, row_mask in enumerate(MASK):
        for t, m in enumerate(row_mask):
            expected = -ADVANTAGES[i] / sum(row_mask) / 3 if m else 0.0
            assert logps.grad[i, t].item() == pytest.approx(expected, abs=1e-12)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        run_loss("ppo")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 1.5])
def test_sequence_level_and_two_sided_clipping_match_hand_computation(loss_type, level, delta):
    _, loss, _ = run_loss(loss_type, beta=BETA, with_is=True, level=level, delta=delta)
    expected = hand_loss(loss_type, BETA, True, level=level, delta=delta)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_two_sided_clipping_caps_a_negative_advantage_token():
    # Row 1 token 2: ratio e^0.8 = 2.23 with A = -0.8; capped at 1.5 its loss is 1.2 instead of 1.78.
    logps, loss, _ = run_loss("bnpo", delta=1.5)
    _, plain, _ = run_loss("bnpo")
    assert loss.item() < plain.item()
    loss.backward()
    assert logps.grad[1, 2].item() == 0.0  # the capped ratio passes no gradient
    assert logps.grad[1, 1].item() != 0.0


def test_sequence_level_clips_whole_completions():
    # Row 0's mean log-ratio is (0.1 + 0.4 - 0.1 + 0) / 4 = 0.1: e^0.1 inside [0.8, 1.28], every token
    # trained; with epsilon_high 0.05 the whole row is clipped (A > 0) and no token of it gets a gradient.
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logps, torch.tensor(OLD_LOGPS, dtype=torch.float64),
                            torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK), loss_type="bnpo",
                            epsilon_low=EPS_LOW, epsilon_high=0.05, importance_sampling_level="sequence")
    loss.backward()
    assert torch.all(logps.grad[0] == 0)
    assert torch.all(logps.grad[2, :2] != 0)
    assert stats["clip_ratio/high"].item() == pytest.approx(4 / 9)  # row 0's four tokens of the nine real ones


def test_entropy_mask_drops_the_policy_term_but_keeps_kl_and_normalisation():
    kept = [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.tensor(OLD_LOGPS, dtype=torch.float64),
                        torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK), loss_type="grpo",
                        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                        ref_logps=torch.tensor(REF_LOGPS, dtype=torch.float64),
                        entropy_mask=torch.tensor(kept, dtype=torch.float64))
    assert loss.item() == pytest.approx(hand_loss("grpo", BETA, kept=kept), abs=1e-6)
    assert loss.item() != pytest.approx(hand_loss("grpo", BETA), abs=1e-3)


# Row 1 (advantage -0.8) drifted: its mean log π_sampling − log π over its three tokens is (0.2 + 0.8 + 0.5) / 3
# = 0.5. Row 0 drifted as far (0.6) but has a positive advantage.
SAMPLING_LOGPS = [[-0.4, 0.1, -1.4, 0.5], [-0.1, -0.4, -0.2, -5.0], [-2.5, -0.2, -1.0, -1.0]]


@pytest.mark.parametrize(("threshold", "kept_rows"), [(0.3, [1, 0, 1]), (0.45, [1, 0, 1]), (0.55, [1, 1, 1])])
def test_off_policy_mask_drops_drifted_negative_completions(threshold, kept_rows):
    sequence_mask = off_policy_sequence_mask(torch.tensor(ADVANTAGES, dtype=torch.float64),
                                             torch.tensor(LOGPS, dtype=torch.float64),
                                             torch.tensor(SAMPLING_LOGPS, dtype=torch.float64),
                                             torch.tensor(MASK, dtype=torch.float64), threshold)
    assert sequence_mask.squeeze(1).tolist() == kept_rows


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_off_policy_masking_drops_the_policy_term_but_keeps_kl(loss_type):
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.tensor(OLD_LOGPS, dtype=torch.float64),
                        torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK), loss_type=loss_type,
                        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                        ref_logps=torch.tensor(REF_LOGPS, dtype=torch.float64), off_policy_mask_threshold=0.3,
                        sampling_logps=torch.tensor(SAMPLING_LOGPS, dtype=torch.float64),
                        max_completion_length=MAX_LEN)
    kept = [[1] * 4, [0] * 4, [1] * 4]
    assert loss.item() == pytest.approx(hand_loss(loss_type, BETA, kept=kept), abs=1e-6)
    assert loss.item() != pytest.approx(hand_loss(loss_type, BETA), abs=1e-3)


def test_off_policy_masking_without_engine_logprobs_measures_drift_from_the_old_policy():
    # Row 1's mean log π_old − log π is (0.2 + 0 − 0.8) / 3 = −0.2: never above a positive threshold.
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.tensor(OLD_LOGPS, dtype=torch.float64),
                        torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK), loss_type="bnpo",
                        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, off_policy_mask_threshold=0.01)
    assert loss.item() == pytest.approx(hand_loss("bnpo"), abs=1e-6)
    old = [row[:] for row in OLD_LOGPS]
    old[1] = [-0.2, -0.9, -0.6, -0.9]  # now (0.1 + 0.3 + 0.1) / 3 above log π
    loss, _ = grpo_loss(logps, torch.tensor(old, dtype=torch.float64), torch.tensor(ADVANTAGES, dtype=torch.float64),
                        torch.tensor(MASK), loss_type="bnpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                        off_policy_mask_threshold=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(hand_loss("bnpo", old=old, kept=[[1] * 4, [0] * 4, [1] * 4]), abs=1e-6)
    assert torch.all(logps.grad[1] == 0)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_is_weighted_by_the_probability_ratio(loss_type, level):
    logps = torch.tensor(LOGPS, dtype=torch.float64)
    loss, stats = grpo_loss(logps, torch.tensor(OLD_LOGPS, dtype=torch.float64),
                            torch.tensor(ADVANTAGES, dtype=torch.float64), torch.tensor(MASK), loss_type=loss_type,
                            epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, importance_sampling_level=level, beta=BETA,
                            ref_logps=torch.tensor(REF_LOGPS, dtype=torch.float64), kl_bias_correction=True,
                            max_completion_length=MAX_LEN)
    assert loss.item() == pytest.approx(hand_loss(loss_type, BETA, level=level, kl_correction=True), abs=1e-6)
    weighted_kl = [hand_ratio(i, t, level) * (math.exp(REF_LOGPS[i][t] - LOGPS[i][t])
                                              - (REF_LOGPS[i][t] - LOGPS[i][t]) - 1)
                   for i in range(3) for t in range(4) if MASK[i][t]]
    assert stats["kl"].item() == pytest.approx(sum(weighted_kl) / len(weighted_kl), abs=1e-9)


@pytest.mark.parametrize("corrected", [True, False])
def test_on_policy_bias_corrected_kl_gradient_is_the_log_ratio(corrected):
    # With zero advantages only the KL term moves log π. Its on-policy gradient per token is (bnpo: ÷ 9 tokens)
    # log π − log π_ref with the correction (that of the true KL), 1 − π_ref / π without (the k3 estimator's).
    logps = torch.tensor(LOGPS, dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.zeros(3, dtype=torch.float64), torch.tensor(MASK),
                        loss_type="bnpo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
                        ref_logps=torch.tensor(REF_LOGPS, dtype=torch.float64), kl_bias_correction=corrected)
    loss.backward()
    for i in range(3):
        for t in range(4):
            log_ratio = LOGPS[i][t] - REF_LOGPS[i][t]
            per_token = log_ratio if corrected else 1 - math.exp(-log_ratio)
            expected = BETA * per_token / 9 if MASK[i][t] else 0.0
            assert logps.grad[i, t].item() == pytest.approx(expected, abs=1e-12), (i, t)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize(("clip_min", "clip_max"), [(None, 1.5), (0.95, 1.5), (0.95, None)])
def test_importance_sampling_weights_match_hand_computation(mode, clip_min, clip_max):
    # Row 0 has a token ratio above 1.5 (e^0.6) and a sequence ratio above it (e^0.5); rows 0 and 1 have token
    # ratios below 0.95 (e^-0.1), and row 1 a sequence ratio below it (e^-0.1).
    sampling = [[-1.0, -1.5, -1.8, -0.2], [-0.2, -1.1, -1.4, -0.3], [-2.1, -0.3, -1.0, -1.0]]
    weights = importance_sampling_weights(torch.tensor(OLD_LOGPS, dtype=torch.float64),
                                          torch.tensor(sampling, dtype=torch.float64), torch.tensor(MASK),
                                          mode=mode, clip_min=clip_min, clip_max=clip_max)
    level, constraint = mode.split("_")
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    for i in range(3):
        sequence_log_ratio = sum(OLD_LOGPS[i][t] - sampling[i][t] for t in range(4) if MASK[i][t])
        for t in range(4):
            log_ratio = OLD_LOGPS[i][t] - sampling[i][t] if level == "token" else sequence_log_ratio
            ratio = math.exp(log_ratio)
            if constraint == "truncate":
                expected = min(max(ratio, low), high)
            else:
                expected = ratio if low <= ratio <= high else 0.0
            assert weights[i, t].item() == pytest.approx(expected, abs=1e-12), (i, t)
    assert (weights == 0).any().item() == (constraint == "mask")


def test_unknown_importance_sampling_level_is_refused():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        run_loss("grpo", level="group")


REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0]


def hand_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_hand_computation(scale):
    advantages, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4, scale)
    expected = []
    for group in (REWARDS[:4], REWARDS[4:]):
        mean = sum(group) / 4
        for r in group:
            denominator = {"group": hand_std(group) + 1e-4, "batch": hand_std(REWARDS) + 1e-4, "none": 1.0}[scale]
            expected.append((r - mean) / denominator)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-9)
    # A group whose rewards are all equal has zero advantage whatever the scaling.
    assert advantages[4:].abs().max().item() == 0.0


def test_groups_of_one_have_zero_std_and_zero_advantage():
    rewards = torch.tensor([0.3, 1.0, -2.0], dtype=torch.float64)
    assert group_std(rewards, 1).tolist() == [0.0, 0.0, 0.0]
    for scale in ("group", "batch", "none"):
        advantages, _ = group_advantages(rewards, 1, scale)
        assert advantages.tolist() == [0.0, 0.0, 0.0]


def test_decoupled_advantages_normalise_each_reward_in_its_group_then_the_sum_over_the_batch():
    # Two functions, two groups of three; the second function abstains (None) on one completion of group 0.
    nan = float("nan")
    per_func = [[1.0, 10.0], [0.0, nan], [2.0, 30.0], [5.0, 0.0], [5.0, 1.0], [2.0, 2.0]]
    weights = [1.0, 0.5]

    def normalised(column, group):
        values = [per_func[r][column] for r in group if not math.isnan(per_func[r][column])]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return {r: (per_func[r][column] - mean) / (std + 1e-4) for r in group if not math.isnan(per_func[r][column])}

    totals = [0.0] * 6
    for group in ([0, 1, 2], [3, 4, 5]):
        for column, weight in enumerate(weights):
            for row, value in normalised(column, group).items():
                totals[row] += weight * value
    mean = sum(totals) / 6
    expected = [(t - mean) / (hand_std(totals) + 1e-4) for t in totals]

    advantages = decoupled_group_advantages(torch.tensor(per_func, dtype=torch.float64),
                                            torch.tensor(weights, dtype=torch.float64), 3)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-9)
    summed, _ = group_advantages(combine_rewards(torch.tensor(per_func, dtype=torch.float64),
                                                 torch.tensor(weights, dtype=torch.float64)), 3, "group")
    assert summed.tolist() != pytest.approx(expected, abs=1e-3)


def test_rewards_receive_columns_and_none_is_skipped_in_the_weighted_sum():
    seen = {}

    def length_reward(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(answer=answer, ids=completion_ids, kwargs=sorted(kwargs))
        return [float(len(c)) for c in completions]

    def picky_reward(completions, **kwargs):
        return [None if c == "bb" else 1.0 for c in completions]

    per_func = compute_rewards([length_reward, picky_reward], ["p", "q"], ["a", "bb"], [[97], [98, 98]],
                               {"answer": ["x", "y"]}, trainer_state="state")
    assert seen == {"answer": ["x", "y"], "ids": [[97], [98, 98]], "kwargs": ["trainer_state"]}
    assert torch.isnan(per_func[1, 1])
    total = combine_rewards(per_func, torch.tensor([2.0, 0.5]))
    assert total.tolist() == [2.0 * 1 + 0.5 * 1, 2.0 * 2]


def test_columns_named_like_reward_arguments_are_shadowed_by_the_trainers_values():
    seen = {}

    def reward(prompts, completions, completion_ids, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, state=trainer_state)
        return [0.0]

    columns = {"prompts": ["column"], "completions": ["column"], "completion_ids": [[0]], "trainer_state": ["column"]}
    compute_rewards([reward], ["p"], ["a"], [[97]], columns, trainer_state="state")
    assert seen == {"prompts": ["p"], "completions": ["a"], "ids": [[97]], "state": "state"}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_from_rewards_matches_hand_computation(loss_type):
    # Two groups of two completions: rewards -> group-normalised advantages -> clipped, KL-penalised loss.
    rewards = [1.0, 0.25, 0.0, 2.0]
    logps = LOGPS + [[-0.6, -0.2, -1.3, -0.8]]
    old = OLD_LOGPS + [[-0.9, -0.2, -1.0, -0.8]]
    ref = REF_LOGPS + [[-0.5, -0.3, -1.1, -0.9]]
    mask = MASK + [[1, 1, 1, 0]]
    advantages = []
    for group in (rewards[:2], rewards[2:]):
        mean = sum(group) / 2
        for r in group:
            advantages.append((r - mean) / (hand_std(group) + 1e-4))
    expected = hand_loss(loss_type, beta=BETA, mask=mask, advantages=advantages, logps=logps, old=old, ref=ref)

    computed_advantages, _ = group_advantages(torch.tensor(rewards, dtype=torch.float64), 2, "group")
    loss, _ = grpo_loss(
        torch.tensor(logps, dtype=torch.float64), torch.tensor(old, dtype=torch.float64), computed_advantages,
        torch.tensor(mask), loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA,
        ref_logps=torch.tensor(ref, dtype=torch.float64), max_completion_length=MAX_LEN,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_masked_extremes_skip_padding_and_are_nan_without_tokens():
    values = torch.tensor([[3.0, -1.0, 9.0], [0.5, 7.0, -4.0]])
    low, high = masked_extremes(values, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert (low.item(), high.item()) == (-1.0, 3.0)
    low, high = masked_extremes(values, torch.zeros(2, 3))
    assert low.isnan() and high.isnan()
