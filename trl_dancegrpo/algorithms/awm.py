"""Advantage Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models", arXiv 2509.25050).

The pretraining flow-matching loss on the rollout's clean samples, weighted by the advantage. With
`x_t = (1 - sigma) x0 + sigma * noise` and the target velocity `noise - x0`, the matching loss
`m = mean((v_theta(x_t) - (noise - x0))^2)` gives a surrogate log-likelihood `l = -w(sigma, m)` (the weighting
`awm_weighting`: `m`, `sigma m`, `sigma^2 m`, or the generalised Huber `sigma ((m + 1e-10)^p - 1e-10^p) / p`), and the
loss is PPO's clipped policy gradient on the ratio `exp(l - l_old)` of the current to the sampling policy:

    L = max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))

On-policy the ratio is 1 and its gradient is `-A * grad l`: the matching loss weighted by the advantage, which raises
the likelihood of better-than-average samples and lowers that of worse ones (the paper's Eq. for AWM; the ratio form
is Flow-Factory's, which lets a rollout feed several optimizer steps).
"""

import torch

from ..objectives import clipped_mask, clipped_policy_loss, policy_metrics
from .base import ForwardProcessAlgorithm


GHUBER_EPS = 1e-10


def matching_log_likelihood(velocity, target, sigma, weighting: str, power: float = 0.25) -> torch.Tensor:
    """AWM's per-sample surrogate log-likelihood `-w(sigma, m)` of the matching loss `m` (computed in float64).

    Args:
        velocity (`torch.Tensor`): `v_theta(x_t)`, `[B, ...]`; target (`torch.Tensor`): `noise - x0`.
        sigma (`torch.Tensor`): The noise level of each sample, broadcastable to `velocity`.
        weighting (`str`): `"uniform"`, `"sigma"`, `"sigma_squared"` or `"ghuber"`; power (`float`): ghuber's `p`.
    """
    matching = (velocity.double() - target.double()).pow(2).flatten(1).mean(1)
    sigma = sigma.double().flatten()
    if weighting == "uniform":
        weighted = matching
    elif weighting == "sigma":
        weighted = sigma * matching
    elif weighting == "sigma_squared":
        weighted = sigma.pow(2) * matching
    elif weighting == "ghuber":
        weighted = sigma * ((matching + GHUBER_EPS).pow(power) - GHUBER_EPS**power) / power
    else:
        raise ValueError(f"awm_weighting must be 'uniform', 'sigma', 'sigma_squared' or 'ghuber', got {weighting!r}.")
    return (-weighted).float()


class AWM(ForwardProcessAlgorithm):
    """`algorithm="awm"`: the advantage-weighted matching loss on the clean samples of a deterministic rollout."""

    name = "awm"
    card_name = "Advantage Weighted Matching (AWM)"
    card_paper = "2509.25050"
    card_procedure = (
        "AWM samples a group of {outputs} per prompt with the deterministic (ODE) sampler, scores them with the reward "
        "models and turns the rewards into group-relative advantages. It trains the {denoiser} with the pretraining "
        "flow-matching loss on the forward (noising) process of the clean samples, weighted by each sample's "
        "advantage (in PPO's clipped ratio form): better-than-average samples become more likely, worse ones less, "
        "with no sampler trajectory and no classifier-free guidance in training."
    )
    card_settings = ("awm_weighting", "awm_ghuber_power", "awm_clip_range", "sample_with_ema")
    citations = (
        """\
@article{xue2025awm,
  title   = {Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models},
  author  = {Xue, Shuchen and Ge, Chongjian and Zhang, Shilong and Li, Yichen and Ma, Zhi-Ming},
  journal = {arXiv preprint arXiv:2509.25050},
  year    = {2025}
}""",
    )

    def log_likelihood(self, velocity, target, sigma) -> torch.Tensor:
        return matching_log_likelihood(velocity, target, sigma, self.args.awm_weighting, self.args.awm_ghuber_power)

    def step_loss(self, trainer, model, chunk, s, j, stats) -> torch.Tensor:
        velocity, _, x0, noise, sigma = self.forward(model, chunk, s, j, trainer.accelerator.autocast)
        target = noise - x0
        log_lik = self.log_likelihood(velocity, target, sigma)
        old_log_lik = self.log_likelihood(self.old_velocity(chunk, s, j, velocity), target, sigma)
        advantages = chunk["advantages"][s]
        clip = self.args.awm_clip_range
        per_sample, ratio, log_ratio = clipped_policy_loss(log_lik, old_log_lik, advantages, clip)
        stats["ratio"].append(ratio.detach())
        stats["log_ratio"].append(log_ratio.detach())
        stats["clipped"].append(clipped_mask(ratio, advantages, clip))
        stats["matching"].append(-log_lik.detach())
        return per_sample.sum()

    def metrics(self, stats) -> dict[str, float]:
        metrics = policy_metrics(stats)
        metrics["awm/weighted_matching_loss"] = torch.cat(stats["matching"]).mean().item()
        return metrics
