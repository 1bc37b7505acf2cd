"""The free functions of the objective (objectives.py) against float64 references written out here."""

import math

import torch

from trl_dancegrpo.objectives import clipped_mask, clipped_policy_loss, gaussian_kl, policy_metrics


def test_clipped_policy_loss_matches_ppo_clip():
    generator = torch.Generator().manual_seed(0)
    log_prob = torch.randn(64, generator=generator) * 0.1
    old_log_prob = torch.randn(64, generator=generator) * 0.1
    advantages = torch.randn(64, generator=generator)
    epsilon = 0.05
    loss, ratio, log_ratio = clipped_policy_loss(log_prob, old_log_prob, advantages, epsilon)
    for i in range(64):
        r = math.exp(float(log_prob[i].double() - old_log_prob[i].double()))
        a = float(advantages[i])
        expected = max(-a * r, -a * min(max(r, 1 - epsilon), 1 + epsilon))
        assert abs(float(loss[i]) - expected) < 1e-6
        assert abs(float(ratio[i]) - r) < 1e-6
    mask = clipped_mask(ratio, advantages, epsilon)
    # where the clip is active the loss is the clipped term and has no gradient through the ratio
    assert mask.any() and (~mask).any()
    inside = log_prob.clone().requires_grad_(True)
    clipped_policy_loss(inside, old_log_prob, advantages, epsilon)[0].sum().backward()
    assert torch.equal(inside.grad[mask], torch.zeros(int(mask.sum())))
    assert (inside.grad[~mask] != 0).all()


def test_gaussian_kl_is_the_kl_of_two_gaussians_with_one_std():
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 2, 4, 4, generator=generator)
    ref_mean = torch.randn(3, 2, 4, 4, generator=generator)
    std = torch.tensor([0.3, 0.5, 0.7])
    kl = gaussian_kl(mean, ref_mean, std)
    for b in range(3):
        # KL(N(m, s^2) || N(m', s^2)) = (m - m')^2 / (2 s^2) per dimension, averaged over the dimensions as log_prob is
        m, m_ref, s = mean[b].double().flatten(), ref_mean[b].double().flatten(), float(std[b])
        expected = sum(float(d) ** 2 / (2 * s * s) for d in m - m_ref) / m.numel()
        assert abs(float(kl[b]) - expected) < 1e-5
    assert torch.allclose(
        gaussian_kl(mean, ref_mean, torch.tensor(0.5)), gaussian_kl(mean, ref_mean, torch.full((3,), 0.5))
    )


def test_policy_metrics():
    log_ratio = [torch.tensor([0.0, 0.1]), torch.tensor([-0.2])]
    stats = {
        "ratio": [x.exp() for x in log_ratio],
        "log_ratio": log_ratio,
        "clipped": [torch.tensor([False, True]), torch.tensor([True])],
    }
    metrics = policy_metrics(stats)
    ratios = [math.exp(x) for x in (0.0, 0.1, -0.2)]
    assert abs(metrics["ratio/mean"] - sum(ratios) / 3) < 1e-6
    assert abs(metrics["ratio/max"] - math.exp(0.1)) < 1e-6 and abs(metrics["ratio/min"] - math.exp(-0.2)) < 1e-6
    assert abs(metrics["clip_ratio"] - 2 / 3) < 1e-6
    assert abs(metrics["approx_kl"] - sum(r - 1 - math.log(r) for r in ratios) / 3) < 1e-6
    assert "kl" not in metrics
    assert policy_metrics({**stats, "kl": [torch.tensor([0.5, 1.5])]})["kl"] == 1.0
