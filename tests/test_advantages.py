"""Group-relative advantages against a float64 numpy reference."""

import numpy as np
import pytest
import torch

from trl_dancegrpo import compute_advantages


def reference(rewards, G, weights, clip):
    """Straight from DESIGN.md: A_i = sum_k w_k (r_ik - mean_k) / (std_k + 1e-8) per group, NaN skipped, clamped."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros(rewards.shape[0])
    for start in range(0, rewards.shape[0], G):
        for k in range(rewards.shape[1]):
            r = rewards[start : start + G, k]
            ok = ~np.isnan(r)
            if ok.sum() < 2:
                continue
            mean, std = r[ok].mean(), r[ok].std(ddof=1)
            out[start : start + G][ok] += weights[k] * (r[ok] - mean) / (std + 1e-8)
    return np.clip(out, -clip, clip)


def test_normalize_then_sum_matches_reference_with_weights_and_scales():
    rng = np.random.default_rng(0)
    # two rewards on very different scales: each is normalised on its own before the weighted sum
    rewards = np.stack([rng.normal(0.3, 0.01, 24), rng.normal(50, 20, 24)], axis=1)
    weights = [1.0, 0.5]
    ours = compute_advantages(torch.tensor(rewards, dtype=torch.float32), 6, torch.tensor(weights), adv_clip_max=5.0)
    np.testing.assert_allclose(ours.numpy(), reference(rewards, 6, weights, 5.0), rtol=1e-4, atol=1e-4)


def test_nan_scores_are_left_out_of_the_statistics_and_get_zero():
    rewards = np.array([[1.0], [2.0], [np.nan], [4.0], [5.0], [5.0], [5.0], [5.0]])
    ours = compute_advantages(torch.tensor(rewards, dtype=torch.float32), 4, torch.ones(1), adv_clip_max=5.0)
    np.testing.assert_allclose(ours.numpy(), reference(rewards, 4, [1.0], 5.0), atol=1e-5)
    assert ours[2] == 0
    assert torch.all(ours[4:] == 0)  # a group of equal rewards carries no signal


def test_clamping():
    rewards = torch.tensor([[0.0]] * 11 + [[1.0]])  # one outlier in a group of 12: z = 3.17, below 5
    assert compute_advantages(rewards, 12, torch.ones(1), adv_clip_max=5.0).max() == pytest.approx(3.175, abs=1e-3)
    assert compute_advantages(rewards, 12, torch.ones(1), adv_clip_max=2.0).max() == 2.0


def test_sum_then_normalize():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(8, 2))
    weights = np.array([2.0, -1.0])
    ours = compute_advantages(
        torch.tensor(rewards, dtype=torch.float32), 4, torch.tensor(weights), "sum_then_normalize", adv_clip_max=5.0
    )
    expected = reference((rewards * weights).sum(1, keepdims=True), 4, [1.0], 5.0)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-4)
