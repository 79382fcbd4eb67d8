"""PPO: the loss math on fixed tensors against plain loops (and TRL's log-softmax/entropy helpers), then
`qwenkit ppo` end to end on tiny models: pinned first-step numbers, exact resume after a kill, LoRA
with the adapter-off reference, and a final policy that `qwenkit.load` and transformers read."""

import json
import math
from pathlib import Path

import pytest
import torch

from qwenkit.train.ppo import (
    RunningMoments,
    entropy_of,
    gae,
    kl_shaped_rewards,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)

ROOT = Path(__file__).resolve().parent.parent


def fixed(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LENGTHS = [5, 2, 7, 1]  # response tokens per row; the rest is padding
MASK = torch.tensor([[1.0 if t < n else 0.0 for t in range(7)] for n in LENGTHS], dtype=torch.float64)


def test_kl_shaped_rewards_match_a_loop():
    scores, logprobs, ref = fixed(0, 4), fixed(1, 4, 7), fixed(2, 4, 7)
    got = kl_shaped_rewards(scores, logprobs, ref, MASK, 0.04)
    for i, n in enumerate(LENGTHS):
        for t in range(7):
            expected = 0.0 if t >= n else -0.04 * (logprobs[i, t] - ref[i, t]) + (scores[i] if t == n - 1 else 0)
            assert float(got[i, t]) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_the_discounted_sum_of_td_errors(gamma, lam):
    rewards, values = fixed(3, 4, 7), fixed(4, 4, 7)
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    for i, n in enumerate(LENGTHS):
        v = [float(values[i, t]) for t in range(n)] + [0.0]  # V after the last token is 0
        deltas = [float(rewards[i, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(7):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) if t < n else 0.0
            assert float(advantages[i, t]) == pytest.approx(expected, abs=1e-10)
            assert float(returns[i, t]) == pytest.approx(expected + v[t] if t < n else 0.0, abs=1e-10)
    if gamma == lam == 1.0:  # Monte Carlo: the return is the sum of the rewards still to come
        for i, n in enumerate(LENGTHS):
            assert float(returns[i, 0]) == pytest.approx(float(rewards[i, :n].sum()), abs=1e-10)


def test_masked_whiten_uses_only_the_response_tokens():
    values = fixed(5, 4, 7)
    got = masked_whiten(values, MASK)
    valid = values[MASK.bool()]
    expected = (valid - valid.mean()) / valid.std(unbiased=True)
    torch.testing.assert_close(got[MASK.bool()], expected, atol=1e-6, rtol=0)
    assert float(got[~MASK.bool()].abs().max()) == 0.0


def test_clipped_policy_loss_matches_a_loop():
    old, advantages = fixed(6, 4, 7), fixed(7, 4, 7)
    new = old + 0.4 * fixed(8, 4, 7)  # ratios from about 0.5 to 2: many clipped
    loss, clipfrac = policy_loss(new, old, advantages, MASK, 0.2)
    terms, clipped = [], 0
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            ratio, a = math.exp(float(new[i, t] - old[i, t])), float(advantages[i, t])
            plain, capped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(plain, capped))
            clipped += capped > plain
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-10)
    assert float(clipfrac) == pytest.approx(clipped / len(terms))
    assert 0 < clipped < len(terms)
    # at ratio 1 (the first pass over fresh rollouts) the loss is -mean(A) and nothing is clipped
    loss, clipfrac = policy_loss(old, old, advantages, MASK, 0.2)
    assert float(loss) == pytest.approx(-float(advantages[MASK.bool()].mean()), abs=1e-10)
    assert float(clipfrac) == 0.0


def test_clipped_value_loss_matches_a_loop():
    old, returns = fixed(9, 4, 7), fixed(10, 4, 7)
    new = old + 0.3 * fixed(11, 4, 7)
    loss, clipfrac = value_loss(new, old, returns, MASK, 0.15)
    terms, clipped = [], 0
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            v, v_old, r = float(new[i, t]), float(old[i, t]), float(returns[i, t])
            v_clipped = v_old + min(max(v - v_old, -0.15), 0.15)
            terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
            clipped += (v_clipped - r) ** 2 > (v - r) ** 2
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-10)
    assert float(clipfrac) == pytest.approx(clipped / len(terms))


def test_running_moments_equal_the_statistics_of_everything_seen():
    moments, seen = RunningMoments(), []
    for k, size in enumerate([3, 1, 8, 5]):
        batch = fixed(20 + k, size)
        moments.update(batch)
        seen.append(batch)
        everything = torch.cat(seen)
        assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-12)
        if len(everything) > 1:
            assert moments.std == pytest.approx(float(everything.std(unbiased=True)), abs=1e-12)
    x = fixed(30, 6)
    torch.testing.assert_close(moments.normalize(x, "mean"), x - float(everything.mean()))
    torch.testing.assert_close(
        moments.normalize(x, "mean_std"), (x - float(everything.mean())) / float(everything.std()), atol=1e-6, rtol=0
    )
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.count, restored.mean, restored.std) == (moments.count, moments.mean, moments.std)


def test_token_logprobs_and_entropy_match_trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits, tokens = fixed(40, 3, 5, 11).float(), torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_logprobs(logits, tokens), selective_log_softmax(logits, tokens))
    torch.testing.assert_close(entropy_of(logits), entropy_from_logits(logits))
