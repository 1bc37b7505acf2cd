"""The one denoising loop: batched, model-agnostic, storing the trajectory and the log-prob of every transition.

It is used for the GRPO rollout (stochastic, `eta > 0`), for evaluation and sample images (deterministic, `eta = 0`),
and its building block [`denoise`] is used again by the loss to re-score stored transitions, so that the rollout
and the training forward compute exactly the same thing on the same batch composition.
"""

from dataclasses import dataclass

import torch

from .adapters.base import Conditioning, PipelineAdapter


@dataclass
class Trajectory:
    """A batch of sampled trajectories.

    Attributes:
        latents (`torch.Tensor`): `[N, T + 1, *latent_shape]`, the initial noise followed by the latent after each step.
        log_probs (`torch.Tensor`): `[N, T]` float32, the log-prob of each transition under the sampling policy.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    @classmethod
    def cat(cls, trajectories: list["Trajectory"]) -> "Trajectory":
        return cls(torch.cat([t.latents for t in trajectories]), torch.cat([t.log_probs for t in trajectories]))


def sample_slices(num_samples: int, micro_batch_size: int, rollout_batch_size: int | None) -> list[slice]:
    """Slices of at most `rollout_batch_size` samples that never cross a micro-batch boundary.

    The rollout and the loss both cut their batches with this function, so each denoiser forward of the loss sees
    the same samples, in the same batch shape, as the forward that produced them: this is what makes the ratio
    exactly 1 before any update.
    """
    size = min(rollout_batch_size or micro_batch_size, micro_batch_size)
    slices = []
    for start in range(0, num_samples, micro_batch_size):
        end = min(start + micro_batch_size, num_samples)
        slices.extend(slice(i, min(i + size, end)) for i in range(start, end, size))
    return slices


def index_conditioning(cond: Conditioning, index) -> Conditioning:
    return {key: value[index] for key, value in cond.items()}


def denoise(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    step_index: torch.Tensor,
    cond: Conditioning,
    negative_cond: Conditioning | None = None,
) -> torch.Tensor:
    """The model output for a batch, with classifier-free guidance when `negative_cond` is given.

    With CFG both branches go through the denoiser in one batched forward (unconditional rows first), so the
    log-prob computed from the output is that of the guided step. Keys missing from `negative_cond` (the conditioning
    image of image-to-video) are the same in both branches.
    """
    if negative_cond is None:
        return adapter.predict(denoiser, latents, step_index, cond)
    batch = latents.shape[0]
    both = {}
    for key, value in cond.items():
        negative = negative_cond[key].expand(batch, *negative_cond[key].shape[1:]) if key in negative_cond else value
        both[key] = torch.cat([negative, value])
    output = adapter.predict(denoiser, torch.cat([latents, latents]), torch.cat([step_index, step_index]), both)
    uncond, text = output.float().chunk(2)
    return uncond + adapter.guidance_scale * (text - uncond)


@torch.no_grad()
def sample_trajectories(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    cond: Conditioning,
    noise: torch.Tensor,
    eta: float,
    slices: list[slice],
    negative_cond: Conditioning | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> Trajectory:
    """Run the sampler from `noise` for all samples, `slices` at a time through the denoiser.

    `cond` holds one row per sample. The SDE step runs on the whole batch at once (with one generator per sample when
    a list is given), so the noise a sample receives does not depend on how the batch is sliced or spread over
    processes.
    """
    num_samples = noise.shape[0]
    latents = noise
    all_latents, log_probs = [noise], []
    for i in range(adapter.num_inference_steps):
        step_index = torch.full((num_samples,), i, device=noise.device, dtype=torch.long)
        output = torch.cat(
            [
                denoise(adapter, denoiser, latents[s], step_index[s], index_conditioning(cond, s), negative_cond)
                for s in slices
            ]
        )
        step = adapter.step(output, latents, step_index, eta, generator=generator)
        latents = step.prev_sample
        all_latents.append(latents)
        log_probs.append(step.log_prob)
    return Trajectory(latents=torch.stack(all_latents, dim=1), log_probs=torch.stack(log_probs, dim=1))


@torch.no_grad()
def decode(adapter: PipelineAdapter, latents: torch.Tensor, slices: list[slice]) -> torch.Tensor:
    """Decode final latents to images in [0, 1], a slice at a time, outside any autograd graph."""
    return torch.cat([adapter.decode(latents[s]) for s in slices])
