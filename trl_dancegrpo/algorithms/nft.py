"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117).

The rollout's clean samples `x0` are noised, `x_t = (1 - sigma) x0 + sigma * noise`, and two implicit policies are
built from the trained velocity `v_theta` and the sampling policy's `v_old` (paper, eq. 8):

    v_plus  = beta * v_theta + (1 - beta) * v_old          (the positive policy)
    v_minus = (1 + beta) * v_old - beta * v_theta          (the negative policy)

Each sample's reward becomes an optimality probability `r = 0.5 + 0.5 * clip(A / adv_clip_max, -1, 1)` (the paper's
`r = 1/2 + 1/2 clip((reward - E reward) / Z, -1, 1)` with the group-normalised advantage `A` and `Z = adv_clip_max`, as
Flow-Factory, whose NFT trainer says it follows the official code), and the loss pulls the positive policy towards high-reward samples and the
negative one towards low-reward samples:

    L = (r * ||x0_plus - x0||^2 / w_plus + (1 - r) * ||x0_minus - x0||^2 / w_minus) * adv_clip_max / beta

with `x0_pm = x_t - sigma * v_pm` (so `||x0_pm - x0||^2 = sigma^2 ||v_pm - (noise - x0)||^2`, the paper's velocity loss
times `sigma^2`) and the adaptive weights `w = mean|x0_pm - x0|` (no gradient, at least 1e-5) of Flow-Factory's
implementation; `||.||^2` is the mean over the non-batch dimensions. At `r = 1/2` (a zero advantage) the two terms'
gradients cancel to first order: only samples better or worse than their group's mean move the model.
"""

import torch

from .base import ForwardProcessAlgorithm


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability in [0, 1] from the advantages: `0.5 + 0.5 * clip(A / max, -1, 1)`."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def implicit_velocities(velocity: torch.Tensor, old_velocity: torch.Tensor, beta: float):
    """The positive and negative velocities `(beta v + (1 - beta) v_old, (1 + beta) v_old - beta v)`."""
    return beta * velocity + (1 - beta) * old_velocity, (1 + beta) * old_velocity - beta * velocity


def adaptive_x0_loss(x0_prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample `mean((x0_prediction - x0)^2) / w` with `w = mean|x0_prediction - x0|` (no gradient, >= 1e-5)."""
    dims = tuple(range(1, x0.dim()))
    error = x0_prediction - x0
    with torch.no_grad():
        weight = error.abs().mean(dim=dims).clamp_min(1e-5)
    return error.pow(2).mean(dim=dims) / weight


def nft_loss(velocity, old_velocity, x_t, x0, sigma, advantages, beta: float, adv_clip_max: float):
    """The per-sample DiffusionNFT loss (see the module docstring) and its positive and negative terms.

    Args:
        velocity (`torch.Tensor`): `v_theta(x_t)`, `[B, ...]`, with its gradient.
        old_velocity (`torch.Tensor`): `v_old(x_t)` of the sampling policy, no gradient.
        x_t (`torch.Tensor`): The noised samples; `x0` the clean ones; `sigma` broadcastable to them.
        advantages (`torch.Tensor`): `[B]` group-relative advantages.
        beta (`float`): `nft_beta`; adv_clip_max (`float`): the advantages' clip, which maps them to `[0, 1]`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]`: the `[B]` loss, the positive and negative
        terms and the optimality `r`.
    """
    r = optimality(advantages, adv_clip_max)
    positive, negative = implicit_velocities(velocity, old_velocity, beta)
    positive_loss = adaptive_x0_loss(x_t - sigma * positive, x0)
    negative_loss = adaptive_x0_loss(x_t - sigma * negative, x0)
    loss = (r * positive_loss + (1 - r) * negative_loss) * adv_clip_max / beta
    return loss, positive_loss, negative_loss, r


class NFT(ForwardProcessAlgorithm):
    """`algorithm="nft"`: the DiffusionNFT loss on the clean samples of a deterministic rollout."""

    name = "nft"
    card_name = "DiffusionNFT"
    card_paper = "2509.16117"
    card_procedure = (
        "DiffusionNFT samples a group of {outputs} per prompt with the deterministic (ODE) sampler, scores them with "
        "the reward models and turns the rewards into group-relative advantages, then maps each to an optimality "
        "probability. It trains the {denoiser} on the forward (noising) process of the clean samples: a flow-matching "
        "loss that pulls an implicit positive policy towards the better samples and an implicit negative one towards "
        "the worse, with no likelihoods, no sampler trajectory and no classifier-free guidance in training."
    )
    card_settings = ("nft_beta", "adv_clip_max", "sample_with_ema")
    citations = (
        """\
@article{zheng2025diffusionnft,
  title   = {DiffusionNFT: Online Diffusion Reinforcement with Forward Process},
  author  = {Zheng, Kaiwen and Chen, Huayu and Ye, Haotian and Wang, Haoxiang and Zhang, Qinsheng and Jiang, Kai
             and Su, Hang and Ermon, Stefano and Zhu, Jun and Liu, Ming-Yu},
  journal = {arXiv preprint arXiv:2509.16117},
  year    = {2025}
}""",
    )

    def step_loss(self, trainer, model, chunk, s, j, stats) -> torch.Tensor:
        velocity, x_t, x0, _, sigma = self.forward(model, chunk, s, j, trainer.accelerator.autocast)
        old = self.old_velocity(chunk, s, j, velocity)
        loss, positive, negative, r = nft_loss(
            velocity, old, x_t, x0, sigma, chunk["advantages"][s], self.args.nft_beta, self.args.adv_clip_max
        )
        for key, value in (("positive_loss", positive), ("negative_loss", negative), ("optimality", r)):
            stats[key].append(value.detach())
        stats["old_distance"].append((velocity.detach() - old).pow(2).flatten(1).mean(1))
        return loss.sum()

    def metrics(self, stats) -> dict[str, float]:
        return {f"nft/{key}": torch.cat(values).mean().item() for key, values in stats.items()}
