"""GRPO-Guard (Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319): `DanceGRPOConfig.algorithm="grpo_guard"`.

GRPO's per-step ratio `exp(log p_theta(x') - log p_old(x'))` of a Gaussian transition `x' ~ N(mu, s**2)` is biased
and has a step-dependent spread: with `d = mu_theta - mu_old` and `x' - mu_old = s * z`,

    log-ratio = mean(d * z) / s - mean(d**2) / (2 s**2)

so its mean sits below 0 (the ratio below 1, where the clip never stops a positive-advantage sample) and its scale
grows as `1 / s`, which differs widely across steps. GRPO-Guard's two changes:

1. RatioNorm: the quadratic term is added back and the result multiplied by `s`, which leaves

       normalized log-ratio = (log-ratio + mean(d**2) / (2 s**2)) * s = mean(d * (x' - mu_old)) / s = mean(d * z),

   centred on 0 for every step, and exactly 0 (ratio 1) on-policy;
2. gradient reweighting: each step's clipped loss is multiplied by `1 / (-dt) = 1 / (sigma - sigma_next)`. The
   transition mean moves with the velocity as `dt * v`, so the normalized ratio's gradient carries a factor `-dt`
   that this weight removes: every step then pushes the velocity equally hard.

The formulas are those of the two public implementations: Flow-Factory's `GRPOGuardTrainer`
(`src/flow_factory/trainers/grpo.py`: the ratio `exp(dlogp * s + mse / (2 s))`) and verl-omni's `GRPOGuardLoss`
(`verl_omni/trainer/diffusion/diffusion_algos.py`, docs `algo/grpo_guard.md`: the same ratio, the loss divided by
`sqrt(-dt)**2`). We compute the equivalent `mean(d * (x' - mu_old)) / s`, which avoids the cancellation of two large
terms and is exactly 0 on-policy.

Where it applies: the flow SDE step of DanceGRPO and Flow-GRPO (`sde_type` `"dancegrpo"`, `"flow_grpo"`), whose
transition std is `eta_t * sqrt(-dt)` as the paper's derivation assumes. Refused: `sde_type="cps"` (its std
`sigma_next * sin(eta * pi / 2)` does not scale with `sqrt(-dt)`, and its mean does not move as `dt * v`, so neither
the normalization's premise nor the `1 / dt` weight holds; Flow-Factory likewise allows only its Flow-SDE dynamics) and
the DDIM families (Stable Diffusion): the paper and both implementations are for flow matching only, and DDIM's
timestep grid has no `dt` for the reweighting.

The rollout keeps the mean `mu_old` of every transition (`Trajectory.means`, one more latent per step and sample).
"""

import torch

from ..adapters.base import FlowMatchAdapter
from .grpo import DANCEGRPO_CITATION, GRPO


ALGORITHM = "grpo_guard"  # config_checks refuses the sde_types it does not apply to (GUARD_SDE_TYPES there)


def normalized_log_ratio(
    mean: torch.Tensor, old_mean: torch.Tensor, prev_sample: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """GRPO-Guard's normalized log-ratio of a Gaussian transition, per sample:

        mean((mean - old_mean) * (prev_sample - old_mean)) / std

    equal to `(log_prob - old_log_prob + mean((mean - old_mean)**2) / (2 std**2)) * std` for `N(prev_sample; ., std**2)`
    log-probs averaged over the non-batch dimensions.

    Args:
        mean (`torch.Tensor`): `[B, ...]` the transition's mean under the current model.
        old_mean (`torch.Tensor`): `[B, ...]` its mean at the rollout.
        prev_sample (`torch.Tensor`): `[B, ...]` the stored next latent `x'`.
        std (`torch.Tensor`): The transition's std, broadcastable to `[B, 1, ...]`, > 0.

    Returns:
        `torch.Tensor`: `[B]` float32.
    """
    old_mean = old_mean.float()
    product = (mean.float() - old_mean) * (prev_sample.float() - old_mean)
    return product.flatten(1).mean(1) / std.float().flatten()


def guard_policy_loss(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    prev_sample: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    gradient_reweighting: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO-Guard's PPO-clip loss of one transition per sample:

        w * max(-A * r, -A * clip(r, 1 - epsilon, 1 + epsilon)),   r = exp(normalized_log_ratio),   w = 1 / (-dt)

    (`w = 1` without `gradient_reweighting`).

    Args:
        dt (`torch.Tensor`): `[B]` or broadcastable, `sigma_next - sigma` of each sample's step (negative).
        advantages (`torch.Tensor`): `[B]`.
        epsilon (`float`): Clip range of the normalized ratio.

    The other arguments are those of [`normalized_log_ratio`].

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: the `[B]` per-sample loss, the normalized ratio and its log.
    """
    log_ratio = normalized_log_ratio(mean, old_mean, prev_sample, std)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    if gradient_reweighting:
        loss = loss / (-dt.float().flatten())
    return loss, ratio, log_ratio


class GRPOGuard(GRPO):
    """`algorithm="grpo_guard"`: GRPO whose rollout also keeps every transition's mean, with [`guard_policy_loss`] in
    place of the PPO-clip loss (the KL term, best-of-n and the metrics are GRPO's)."""

    name = ALGORITHM
    card_name = "GRPO-Guard"
    card_paper = "2510.22319"
    card_procedure = (
        "DanceGRPO's sampling and advantages (a group of {outputs} per prompt through a stochastic (SDE) sampler, "
        "scored by the reward models, rewards turned into group-relative advantages), with GRPO-Guard's regulated "
        "clipping in the loss: the log-ratio of each trained transition is normalised by its noise level, so that the "
        "clip acts alike at every step{reweighting}, and the {denoiser} is updated with the clipped policy-gradient loss "
        "on a random subset of the sampler steps."
    )
    card_settings = (*GRPO.card_settings, "guard_gradient_reweighting")
    citations = (
        """\
@article{wang2025grpoguard,
  title   = {GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated Clipping},
  author  = {Wang, Jing and Liang, Jiajun and Liu, Jie and Liu, Henglin and Liu, Gongye and Zheng, Jun and Pang, Wanyuan
             and Ma, Ao and Xie, Zhenyu and Wang, Xintao and Wang, Meng and Wan, Pengfei and Liang, Xiaodan},
  journal = {arXiv preprint arXiv:2510.22319},
  year    = {2025}
}""",
        DANCEGRPO_CITATION,
    )

    @classmethod
    def check_adapter(cls, adapter) -> None:
        if not isinstance(adapter, FlowMatchAdapter):  # the DDIM families (Stable Diffusion): timesteps, no sigma grid
            raise ValueError(
                f"algorithm='grpo_guard' is for flow-matching models (FLUX, SD3, Wan, ...); "
                f"{type(adapter.pipeline).__name__} is a diffusion model sampled with DDIM, whose steps have no flow "
                "time step dt for GRPO-Guard's reweighting (the paper and its implementations cover flow matching "
                "only): use algorithm='grpo'."
            )

    def card_description(self, outputs: str, denoiser: str) -> str:
        reweighting = (
            ", and each step's loss is divided by its step size (gradient reweighting)"
            if self.args.guard_gradient_reweighting
            else ""
        )
        return self.card_procedure.format(outputs=outputs, denoiser=denoiser, reweighting=reweighting)

    def rollout_options(self) -> dict:
        return {**super().rollout_options(), "keep_means": True}

    def rollout_batch(self, trajectory, first: int, seed: int, device) -> dict:
        return {**super().rollout_batch(trajectory, first, seed, device), "means": trajectory.means}

    def policy_loss(self, step, chunk: dict, s: slice, rows, step_index):
        """[`guard_policy_loss`] of the samples `s` of a rollout `chunk` (with its `means` and `advantages`),
        recomputed by `TrajectorySampler.recompute_transition` (`step`, `rows`, `step_index`), with `args.epsilon` and
        `args.guard_gradient_reweighting`; `dt` from the adapter's sigma grid."""
        sigmas = self.adapter.sigmas.to(step_index.device)
        dt = sigmas[step_index + 1] - sigmas[step_index]
        old_mean = chunk["means"][s][rows, step_index]
        return guard_policy_loss(
            step.prev_sample_mean,
            old_mean,
            step.prev_sample,
            step.std_dev,
            dt,
            chunk["advantages"][s],
            self.args.epsilon,
            self.args.guard_gradient_reweighting,
        )
