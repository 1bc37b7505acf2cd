"""What every objective provides to the trainer ([`Algorithm`]), and the part DiffusionNFT and AWM share
([`ForwardProcessAlgorithm`]): a deterministic rollout that keeps only the clean samples, and the training forward
on the forward (noising) process `x_t = (1 - sigma) x0 + sigma * noise` at sigmas of the sampler's grid."""

import contextlib

import torch

from ..adapters.base import FlowMatchAdapter
from ..rollout import index_conditioning, mix_seed, sample_slices


class Algorithm:
    """The hooks the trainer calls; `grpo.GRPO`, `nft.NFT` and `awm.AWM` implement them.

    Args:
        args ([`DanceGRPOConfig`]): The configuration.
        adapter ([`PipelineAdapter`]): The model family's adapter.
        sampler ([`~trl_dancegrpo.rollout.TrajectorySampler`]): The trainer's sampler.
    """

    name = ""
    # What the model card says about the objective (hub.write_model_card): its name and arXiv id, a paragraph on the
    # procedure, the configuration fields that shape it (shown after the shared ones) and the papers to cite.
    card_name = ""
    card_paper = ""
    card_procedure = ""
    card_settings: tuple[str, ...] = ()
    citations: tuple[str, ...] = ()
    keeps_trajectory = True  # the rollout batch holds every step's latents and log-probs (estimate-memory reads it)

    def __init__(self, args, adapter, sampler):
        self.args = args
        self.adapter = adapter
        self.sampler = sampler

    @classmethod
    def check_adapter(cls, adapter) -> None:
        """Refuse a model family this objective does not apply to; called by `models.make_adapter`, where the family
        is first known (the trainer and estimate-memory). Every family by default."""

    def card_description(self, outputs: str, denoiser: str) -> str:
        """The model card's paragraph on the procedure (`outputs`: "images" or "videos"; `denoiser`: the trained
        model's name)."""
        return self.card_procedure.format(outputs=outputs, denoiser=denoiser)

    def rollout_options(self) -> dict:
        """Keyword arguments of `TrajectorySampler.rollout` (noise scale, initial-noise groups)."""
        return {"group_size": self.args.num_generations if self.args.init_same_noise else 1}

    def rollout_batch(self, trajectory, first: int, seed: int, device) -> dict:
        """The per-sample tensors of a rollout that the loss needs (the trainer adds advantages and conditioning)."""
        raise NotImplementedError

    def sampling_weights(self, trainer):
        """A context in which the model holds the weights the rollout samples with: the EMA's with `sample_with_ema`
        (NFT, AWM; once the EMA has started), else the trained ones."""
        if getattr(self.args, "sample_with_ema", False) and trainer.ema is not None:
            return trainer.ema.applied()
        return contextlib.nullcontext()

    def prepare_chunk(self, trainer, model, chunk: dict) -> None:
        """Called on each micro-step's chunk right after the rollout, before any of it is trained on."""

    def step_loss(self, trainer, model, chunk: dict, s: slice, j: int, stats: dict) -> torch.Tensor:
        """The summed per-sample loss of the `j`-th trained step of samples `s`; appends its metrics to `stats`."""
        raise NotImplementedError

    def metrics(self, stats: dict) -> dict[str, float]:
        """The logged metrics of one optimization pass, from the `stats` filled by `step_loss`."""
        raise NotImplementedError


def keeps_old_velocity(args) -> bool:
    """Whether NFT and AWM keep the sampling policy's velocities with the rollout: when the sampling policy differs from
    the trained one (a rollout feeds more than one optimizer step, or the EMA samples: `sample_with_ema`). Read by
    estimate-memory too."""
    reuses_rollout = args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps
    return reuses_rollout or args.sample_with_ema


class ForwardProcessAlgorithm(Algorithm):
    """DiffusionNFT and AWM: trained on the forward process, from the clean samples of a deterministic rollout.

    The rollout is the ODE sampler (eta 0), every sample from its own initial noise (with the deterministic sampler a
    shared one would make a group's samples identical); it keeps the final latents and, per sample and trained step
    (the `train_steps` drawn as for GRPO, over the first `T - 1` steps of the grid), a fresh noise drawn from the
    sample's global index. The loss forwards `x_t = (1 - sigma) x0 + sigma * noise` through the conditional model
    (no CFG: both papers train CFG-free). The "old" velocity (the sampling policy's) is the current forward, detached,
    while the rollout is on-policy (one optimizer step per rollout: the weights have not moved since sampling); when a
    rollout feeds later optimizer steps (`steps_per_generation > gradient_accumulation_steps`, `num_iterations > 1`)
    or is sampled with the EMA (`sample_with_ema`), it is computed once after the rollout, under the sampling weights,
    and kept with it.
    """

    keeps_trajectory = False

    @classmethod
    def check_adapter(cls, adapter) -> None:
        if not isinstance(adapter, FlowMatchAdapter):
            raise ValueError(
                f"algorithm={cls.name!r} trains a rectified-flow model on its forward process (x_t = (1 - sigma) "
                f"x0 + sigma * noise, velocity targets); {type(adapter.pipeline).__name__} is a DDIM (epsilon-"
                "prediction) model, for which this trainer implements only algorithm='grpo'."
            )
        if getattr(adapter, "condition_size", 0):  # LTX-2 condition: clean first-frame tokens inside the latent
            raise ValueError(
                f"algorithm={cls.name!r} noises the whole final latent, but {type(adapter.pipeline).__name__} "
                "keeps clean condition tokens in it (a first-frame image), which must stay clean: use "
                "algorithm='grpo' for this pipeline."
            )

    def __init__(self, args, adapter, sampler):
        super().__init__(args, adapter, sampler)
        # the sampling policy differs from the trained one: its velocities are computed once, after the rollout
        self.keeps_old_velocity = keeps_old_velocity(args)

    def rollout_options(self) -> dict:
        return {"eta": 0.0, "group_size": 1, "keep_trajectory": False}

    def rollout_batch(self, trajectory, first: int, seed: int, device) -> dict:
        final = trajectory.final_latents
        train_steps = trajectory.train_steps.to(device)
        noise = []
        for i in range(first, first + final.shape[0]):
            generator = torch.Generator().manual_seed(mix_seed(seed, 4, i))
            noise.append(self.adapter.initial_noise(train_steps.shape[1], generator, device, torch.float32))
        return {"final_latents": final, "train_steps": train_steps, "noise": torch.stack(noise)}

    def forward(self, model, chunk: dict, s: slice, j: int, autocast=contextlib.nullcontext):
        """The velocity of `model` on the `j`-th noised copy of samples `s`: `(v, x_t, x0, noise, sigma)`, the
        velocity in float32 and `sigma` broadcastable to the latents."""
        x0 = chunk["final_latents"][s].float()
        step_index = chunk["train_steps"][s, j]
        noise = chunk["noise"][s, j]
        sigma = self.adapter.sigmas.to(x0.device)[step_index].reshape(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - sigma) * x0 + sigma * noise
        with autocast():
            velocity = self.adapter.predict(model, x_t, step_index, index_conditioning(chunk["cond"], s))
        return velocity.float(), x_t, x0, noise, sigma

    def prepare_chunk(self, trainer, model, chunk: dict) -> None:
        if not self.keeps_old_velocity:
            return
        num_samples, num_steps = chunk["train_steps"].shape
        old = torch.empty_like(chunk["noise"])
        with torch.no_grad(), self.sampling_weights(trainer):
            for s in sample_slices(num_samples, num_samples, self.args.rollout_batch_size):
                for j in range(num_steps):
                    old[s, j] = self.forward(model, chunk, s, j, trainer.accelerator.autocast)[0]
        chunk["old_velocity"] = old

    def old_velocity(self, chunk: dict, s: slice, j: int, velocity: torch.Tensor) -> torch.Tensor:
        """The sampling policy's velocity: kept with a reused rollout, else the current one (same weights), detached."""
        return chunk["old_velocity"][s, j] if "old_velocity" in chunk else velocity.detach()
