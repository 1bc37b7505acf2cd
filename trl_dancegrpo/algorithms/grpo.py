"""DanceGRPO (arXiv 2505.07818): the PPO-clip loss on the log-probs of the stochastic sampler's transitions.

The rollout keeps every step's latents and log-probs (`rollout.Trajectory`); the loss re-scores the trained
transitions under the current model (`TrajectorySampler.recompute_transition`). The math is in `objectives.py`.
"""

import torch

from ..objectives import clipped_mask, clipped_policy_loss, gaussian_kl, policy_metrics
from ..rollout import denoise
from .base import Algorithm


DANCEGRPO_CITATION = """\
@article{xue2025dancegrpo,
  title   = {DanceGRPO: Unleashing GRPO on Visual Generation},
  author  = {Xue, Zeyue and Wu, Jie and Gao, Yu and Kong, Fangyuan and Zhu, Lingting and Chen, Mengzhao and Liu, Zhiheng
             and Liu, Wei and Guo, Qiushan and Huang, Weilin and Luo, Ping},
  journal = {arXiv preprint arXiv:2505.07818},
  year    = {2025}
}"""


class GRPO(Algorithm):
    """`algorithm="grpo"` (the default): DanceGRPO's objective, with the KL term to the starting model (`beta`)."""

    name = "grpo"
    card_name = "DanceGRPO"
    card_paper = "2505.07818"
    card_procedure = (
        "DanceGRPO samples a group of {outputs} per prompt through a stochastic (SDE) sampler, scores them with the "
        "reward models, turns the rewards into group-relative advantages and updates the {denoiser} with a clipped "
        "policy-gradient loss on a random subset of the sampler steps."
    )
    card_settings = (
        "sde_type",
        "sde_window_size",
        "sde_window_range",
        "sde_window_schedule",
        "init_same_noise",
        "epsilon",
        "beta",
    )
    citations = (DANCEGRPO_CITATION,)

    def rollout_batch(self, trajectory, first: int, seed: int, device) -> dict:
        return {
            "latents": trajectory.latents,
            "log_probs": trajectory.log_probs,
            # per sample, a random subset of the window's steps (without one: of all but the last step) to train on
            "train_steps": trajectory.train_steps.to(device),
        }

    def prepare_chunk(self, trainer, model, chunk: dict) -> None:
        if self.args.best_of_n:  # the kept samples were sampled in other batches than the loss will see them in
            self.sampler.rescore(model, chunk, self.args.rollout_batch_size, trainer.accelerator.autocast)

    def policy_loss(self, step, chunk: dict, s: slice, rows, step_index):
        """The clipped loss of the recomputed transitions `step` of samples `s`: `(per-sample loss, ratio, log-ratio)`."""
        old_log_prob = chunk["log_probs"][s][rows, step_index]
        return clipped_policy_loss(step.log_prob, old_log_prob, chunk["advantages"][s], self.args.epsilon)

    def step_loss(self, trainer, model, chunk, s, j, stats) -> torch.Tensor:
        args = self.args
        step, rows, step_index, x_t, cond = self.sampler.recompute_transition(
            model, chunk, s, j, trainer.accelerator.autocast
        )
        advantages = chunk["advantages"][s]
        per_sample, ratio, log_ratio = self.policy_loss(step, chunk, s, rows, step_index)
        if args.beta > 0:
            kl = self.kl_to_reference(trainer, x_t, step_index, cond, chunk["negative_cond"], step)
            per_sample = per_sample + args.beta * kl
            stats["kl"].append(kl.detach())
        stats["ratio"].append(ratio.detach())
        stats["log_ratio"].append(log_ratio.detach())
        stats["clipped"].append(clipped_mask(ratio, advantages, args.epsilon))
        return per_sample.sum()

    def kl_to_reference(self, trainer, x_t, step_index, cond, negative_cond, step) -> torch.Tensor:
        """KL between the Gaussian transitions of the current and the starting model (same std, so a mean distance)."""
        with torch.no_grad(), trainer.accelerator.autocast():
            if trainer.ref_denoiser is not None:
                ref_output = denoise(self.adapter, trainer.ref_denoiser, x_t, step_index, cond, negative_cond)
            else:
                denoiser = trainer.denoiser
                denoiser.disable_adapters()
                try:
                    ref_output = denoise(self.adapter, denoiser, x_t, step_index, cond, negative_cond)
                finally:
                    denoiser.enable_adapters()
            ref = self.adapter.step(ref_output, x_t, step_index, self.sampler.eta, prev_sample=step.prev_sample)
        return gaussian_kl(step.prev_sample_mean, ref.prev_sample_mean, step.std_dev)

    def metrics(self, stats) -> dict[str, float]:
        return policy_metrics(stats)
