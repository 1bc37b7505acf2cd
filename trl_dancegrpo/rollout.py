"""The sampler: the one denoising loop, and everything that decides what a rollout samples.

[`TrajectorySampler`] (not to be confused with the trainer's `PromptSampler`, which picks the dataset rows) owns, for a batch of samples identified by their index in the global batch:
- the initial noise (shared by the samples of a group) and the SDE noise, drawn per sample from its global index, so
  results do not depend on how the batch is split into parts, slices or processes;
- which steps are stochastic: the SDE window (all steps but the last without one), every other step a deterministic
  (ODE) step, the last one always deterministic so rewards see the clean image;
- the shared prefix: the deterministic steps before the window are the same for every sample of a group (same
  initial noise, same conditioning), so they run once per group and are copied to its samples;
- the parts of the rollout (each part is exactly one slice of the loss, so the ratio starts at 1) and which steps of
  each sample are trained.

Its building block [`denoise`] is used again by the loss to recompute the log-probs of stored transitions
(`TrajectorySampler.recompute_transition`), so that the rollout and the
training forward compute exactly the same thing on the same batch composition.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adapters.base import Conditioning, PipelineAdapter


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit seed from integers (Python's `hash` of strings differs between processes)."""
    import numpy as np

    return int(np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class Trajectory:
    """A batch of sampled trajectories.

    Attributes:
        latents (`torch.Tensor`): `[N, T + 1, *latent_shape]`, the initial noise followed by the latent after each step.
        log_probs (`torch.Tensor`): `[N, T]` float32, the log-prob of each transition under the sampling policy (0 for
            deterministic steps).
        window (`range`, *optional*): The stochastic steps, decided once per rollout (`TrajectorySampler.rollout`).
        train_steps (`torch.Tensor`, *optional*): `[N, J]`, the steps of each sample that are trained on.
        extras (`dict`): What the adapter decodes besides the images (`decode_extras`; LTX-2: `audio` `[N, C, S]`
            and `audio_sample_rate`), for the rewards; empty for most families.
        means (`torch.Tensor`, *optional*): `[N, T, *latent_shape]` float32, the mean of each transition (of a
            deterministic step: its result), kept when sampled with `keep_means` (GRPO-Guard's ratio needs them).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    window: range | None = None
    train_steps: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    means: torch.Tensor | None = None

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    @classmethod
    def cat(cls, trajectories: list["Trajectory"]) -> "Trajectory":
        extras = {
            key: torch.cat([t.extras[key] for t in trajectories]) if isinstance(value, torch.Tensor) else value
            for key, value in trajectories[0].extras.items()
        }
        latents, log_probs = (torch.cat([getattr(t, name) for t in trajectories]) for name in ("latents", "log_probs"))
        means = torch.cat([t.means for t in trajectories]) if trajectories[0].means is not None else None
        return cls(latents, log_probs, extras=extras, means=means)


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


def split_batch(batch: dict, num_chunks: int) -> list[dict]:
    """A rollout batch (tensors with one row per sample, `cond`, `negative_cond`) cut into `num_chunks` equal chunks,
    one per micro-step that trains on it."""
    size = batch["advantages"].shape[0] // num_chunks
    chunks = []
    for i in range(num_chunks):
        part = slice(i * size, (i + 1) * size)
        chunk = {key: value[part] for key, value in batch.items() if isinstance(value, torch.Tensor)}
        chunk["cond"] = index_conditioning(batch["cond"], part)
        chunk["negative_cond"] = batch["negative_cond"]
        chunks.append(chunk)
    return chunks


def denoise(
    adapter: PipelineAdapter,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    step_index: torch.Tensor,
    cond: Conditioning,
    negative_cond: Conditioning | None = None,
) -> torch.Tensor:
    """The model output for a batch, with classifier-free guidance when `negative_cond` is given.

    With CFG the adapter's `predict_guided` runs: by default both branches go through the denoiser in one batched
    forward (unconditional rows first, as the adapter's `guidance_batch` builds them), so the log-prob computed from
    the output is that of the guided step; the adapter's `combine_guidance` combines them (plain CFG, or a family's
    variant such as Qwen-Image's norm rescale). LTX-2 adds its pipeline's further guidance forwards.
    """
    if negative_cond is None:
        return adapter.predict(denoiser, latents, step_index, cond)
    return adapter.predict_guided(denoiser, latents, step_index, cond, negative_cond)


class TrajectorySampler:
    """Samples trajectories for a batch: noise per global sample index, the SDE window, the shared prefix, the parts.

    Args:
        adapter ([`PipelineAdapter`]): The model family's adapter (its `step` implements the chosen `sde_type`).
        eta (`float`): Noise scale of the stochastic steps.
        window_size (`int`, *optional*): Consecutive stochastic (and trainable) steps; `None`: all but the last.
        window_range (`tuple[int, int]`, *optional*): `[start, end)` the window may cover; `None`: all but the last.
        window_schedule (`str`, *optional*, defaults to `"random"`): `"random"` or `"sliding"`.
        window_interval (`int`, *optional*, defaults to `1`): Optimizer steps between moves of a sliding window.
        timestep_fraction (`float`, *optional*, defaults to `1.0`): Fraction of the stochastic steps trained.
    """

    def __init__(
        self,
        adapter: PipelineAdapter,
        eta: float,
        window_size: int | None = None,
        window_range: tuple[int, int] | None = None,
        window_schedule: str = "random",
        window_interval: int = 1,
        timestep_fraction: float = 1.0,
    ):
        self.adapter = adapter
        self.eta = eta
        self.num_steps = adapter.num_inference_steps
        self.window_size = window_size
        self.window_range = tuple(window_range) if window_range is not None else (0, self.num_steps - 1)
        self.window_schedule = window_schedule
        self.window_interval = window_interval
        self.timestep_fraction = timestep_fraction

    # -- the loss's forward ----------------------------------------------------------------------------------------
    def recompute_transition(self, denoiser, batch: dict, s: slice, j: int, autocast=contextlib.nullcontext):
        """The j-th trained transition of the samples `s` of a stored rollout `batch`, recomputed under `denoiser`.

        `batch` holds `latents` `[N, T + 1, ...]`, `train_steps` `[N, J]`, `cond` and `negative_cond`. Returns the
        step (its `log_prob` is the transition's log-prob under `denoiser`), the row index, the step indices, the
        latents the step started from and the samples' conditioning.
        """
        step_index = batch["train_steps"][s, j]
        rows = torch.arange(step_index.shape[0], device=step_index.device)
        latents = batch["latents"][s]
        x_t, x_next = latents[rows, step_index], latents[rows, step_index + 1]
        cond = index_conditioning(batch["cond"], s)
        with autocast():
            output = denoise(self.adapter, denoiser, x_t, step_index, cond, batch["negative_cond"])
        step = self.adapter.step(output, x_t, step_index, self.eta, prev_sample=x_next)
        return step, rows, step_index, x_t, cond

    @torch.no_grad()
    def rescore(self, denoiser, chunk: dict, rollout_batch_size: int | None, autocast=contextlib.nullcontext) -> None:
        """Recompute, in place, the old log-probs (and `means`, if kept) of the trained steps of `chunk` in exactly the
        loss's batches (no gradient).

        Best-of-n drops samples after the rollout, so the kept ones were sampled in other batch compositions than the
        loss re-scores them in, and batched kernels (bf16 GPU ones especially) differ with the batch: the ratio would
        start away from 1 and the tiny clip range would clip it. One extra forward per trained step fixes it exactly.
        """
        num_samples, num_steps = chunk["train_steps"].shape
        for s in sample_slices(num_samples, num_samples, rollout_batch_size):
            for j in range(num_steps):
                step, rows, step_index, _, _ = self.recompute_transition(denoiser, chunk, s, j, autocast)
                chunk["log_probs"][s][rows, step_index] = step.log_prob
                if "means" in chunk:
                    chunk["means"][s][rows, step_index] = step.prev_sample_mean

    # -- which steps --------------------------------------------------------------------------------------------------
    def window(self, seed: int, step: int) -> range:
        """The stochastic, trainable steps of the rollout made at optimizer step `step`.

        Without a window size: every step but the last. A `"random"` window's position is drawn from (seed, step), a
        `"sliding"` one moves forward every `window_interval` steps: both are functions of the seed and the step,
        so a resumed run places its windows as one that never stopped.
        """
        if self.window_size is None:
            return range(0, self.num_steps - 1)
        low, high = self.window_range
        positions = high - low - self.window_size + 1
        if self.window_schedule == "sliding":
            start = low + (step // self.window_interval) % positions
        else:
            generator = torch.Generator().manual_seed(mix_seed(seed, 3, step))
            start = low + int(torch.randint(positions, (1,), generator=generator))
        return range(start, start + self.window_size)

    @property
    def num_train_steps(self) -> int:
        """Trained steps per sample: `int(tau * (T - 1))` of all but the last step, or `ceil(tau * k)` of a window."""
        if self.window_size is None:
            return max(1, int(round(self.timestep_fraction * (self.num_steps - 1), 9)))
        return max(1, math.ceil(round(self.timestep_fraction * self.window_size, 9)))

    def train_steps(self, window: range, first: int, num_samples: int, seed: int) -> torch.Tensor:
        """`[num_samples, num_train_steps]`: a random subset of the window's steps per sample, from its global index."""
        subsets = [
            torch.randperm(len(window), generator=torch.Generator().manual_seed(mix_seed(seed, 2, i)))
            for i in range(first, first + num_samples)
        ]
        return torch.stack(subsets)[:, : self.num_train_steps] + window.start

    def step_eta(self, window: range, eta: float) -> list[float]:
        """The noise scale of each step: `eta` inside the window, 0 (a deterministic step) elsewhere and at the end."""
        return [eta if i in window and i < self.num_steps - 1 else 0.0 for i in range(self.num_steps)]

    # -- sampling -----------------------------------------------------------------------------------------------------
    def initial_noise(self, first: int, num_samples: int, seed: int, group_size: int, device) -> torch.Tensor:
        """Initial noise of samples `first ...`; samples of one group of the global batch share it (`group_size` > 1).

        The noise of sample i depends only on (seed, its global group), so a group split over processes still starts
        from one noise.
        """
        noises = []
        for i in range(first, first + num_samples):
            generator = torch.Generator().manual_seed(mix_seed(seed, i // group_size))
            noises.append(self.adapter.initial_noise(1, generator, device, torch.float32))
        return torch.cat(noises)

    def rollout(
        self,
        denoiser,
        cond,
        negative_cond,
        first: int,
        seed: int,
        parts: list[slice],
        window_seed: int,
        optimizer_step: int,
        **kwargs,
    ) -> Trajectory:
        """A training rollout: its SDE window decided once (from `window_seed` and `optimizer_step`, see `window`),
        the samples drawn (`sample`, whose keyword arguments `kwargs` takes), and the trained steps of each sample;
        the window and the trained steps come back with the trajectory."""
        window = self.window(window_seed, optimizer_step)
        trajectory = self.sample(
            denoiser, cond, negative_cond, first=first, seed=seed, parts=parts, window=window, **kwargs
        )
        trajectory.window = window
        trajectory.train_steps = self.train_steps(window, first, parts[-1].stop, seed)
        return trajectory

    @torch.no_grad()
    def sample(
        self,
        denoiser: torch.nn.Module,
        cond: Conditioning,
        negative_cond: Conditioning | None,
        first: int,
        seed: int,
        parts: list[slice],
        window: range | None = None,
        eta: float | None = None,
        group_size: int = 1,
        share_prefix: bool = True,
        autocast: Callable | None = None,
        on_part: Callable[..., None] | None = None,
        keep_means: bool = False,
        keep_trajectory: bool = True,
    ) -> Trajectory:
        """Sample and decode the trajectories of the samples `first, first + 1, ...` of the global batch.

        Args:
            denoiser (`torch.nn.Module`): The model to sample with.
            cond (`Conditioning`): One row per sample; `negative_cond` the unconditional branch of CFG, or `None`.
            first (`int`): Global index of the first sample (its noise).
            seed (`int`): Seed of this rollout.
            parts (`list[slice]`): Consecutive parts the samples go through the denoiser in (the loss's slices); each
                is decoded and handed to `on_part(part, images, **extras)` before the next one is sampled (`extras`:
                the adapter's `decode_extras`, such as LTX-2's audio).
            window (`range`, *optional*): The stochastic steps; `None`: all but the last.
            eta (`float`, *optional*): Noise scale of the stochastic steps; `None`: the sampler's. `0` samples the ODE.
            group_size (`int`): Samples `i`, `j` share their initial noise when `i // group_size == j // group_size`.
            share_prefix (`bool`): Run the deterministic steps before the first stochastic one once per group, in
                batches of at most the largest part (identical results; `False` runs them per sample).
            autocast (`Callable`, *optional*): A context-manager factory (mixed precision) for the forwards and decoding.
            keep_means (`bool`): Keep the mean of every transition in `Trajectory.means` (GRPO-Guard).
            keep_trajectory (`bool`): Keep every step's latents and log-probs; `False` keeps only the last step's
                (`latents` is then `[N, 1, ...]`, the final latents: what DiffusionNFT and AWM train on).
        """
        step_eta = self.step_eta(
            range(0, self.num_steps - 1) if window is None else window, self.eta if eta is None else eta
        )
        num_samples = parts[-1].stop
        device = next(iter(cond.values())).device
        autocast = autocast or contextlib.nullcontext
        noise = self.adapter.start_latents(self.initial_noise(first, num_samples, seed, group_size, device), cond)
        generators = [torch.Generator().manual_seed(mix_seed(seed, 1, first + i)) for i in range(num_samples)]
        # deterministic steps draw no noise, so each sample's generator gives the same noise to its stochastic steps
        # whether the prefix is shared or not
        prefix = next((i for i, value in enumerate(step_eta) if value > 0), self.num_steps)
        latents, start = [noise], 0
        if share_prefix and group_size > 1 and prefix > 0:
            with autocast():
                latents = self._shared_prefix(denoiser, noise, cond, negative_cond, first, group_size, prefix, parts)
            start = prefix
        zeros = torch.zeros(num_samples, device=device)
        trajectories = []
        for part in parts:
            part_latents, part_log_probs = [x[part] for x in latents], [zeros[part]] * start
            # a shared prefix's deterministic steps: their means are their results
            part_means = [x.float() for x in part_latents[1:]] if keep_means else []
            part_cond = index_conditioning(cond, part)
            with autocast():
                for i in range(start, self.num_steps):
                    step = self._advance(
                        denoiser, part_latents[-1], i, part_cond, negative_cond, step_eta[i], generators[part]
                    )
                    part_latents.append(step.prev_sample)
                    part_log_probs.append(step.log_prob)
                    if keep_means:
                        part_means.append(step.prev_sample_mean)
                    if not keep_trajectory:
                        part_latents, part_log_probs = part_latents[-1:], part_log_probs[-1:]
                images = self.adapter.decode(part_latents[-1])
                extras = self.adapter.decode_extras(part_latents[-1])
            means = torch.stack(part_means, dim=1) if keep_means else None
            trajectories.append(
                Trajectory(
                    torch.stack(part_latents, dim=1), torch.stack(part_log_probs, dim=1), extras=extras, means=means
                )
            )
            if on_part is not None:
                on_part(part, images, **extras)
        return Trajectory.cat(trajectories)

    @staticmethod
    def _prefix_heads(cond: Conditioning, first: int, group_size: int, num_samples: int) -> list[int]:
        """For each sample, the first sample with the same initial noise (its group) and identical conditioning.

        In training a group is one prompt (and image) repeated, but `generate` may give a group different prompts or
        conditioning images: only samples that agree on both have the same deterministic steps.
        """
        heads = []
        for i in range(num_samples):
            group = (first + i) // group_size
            heads.append(
                next(
                    j
                    for j in dict.fromkeys(heads + [i])
                    if (first + j) // group_size == group and all(torch.equal(v[j], v[i]) for v in cond.values())
                )
            )
        return heads

    def _shared_prefix(self, denoiser, noise, cond, negative_cond, first, group_size, prefix, parts):
        """`[noise, x_1, ..., x_prefix]` for every sample, each step run once per group of identical samples."""
        groups = self._prefix_heads(cond, first, group_size, noise.shape[0])
        heads = sorted(set(groups))
        batch = max(part.stop - part.start for part in parts)
        chunks = []  # [heads in the slice, prefix, ...] each
        for s in sample_slices(len(heads), len(heads), batch):
            rows = torch.tensor(heads[s], device=noise.device)
            steps, row_cond = [noise[rows]], index_conditioning(cond, rows)
            for i in range(prefix):
                steps.append(self._advance(denoiser, steps[-1], i, row_cond, negative_cond, 0.0, None).prev_sample)
            chunks.append(torch.stack(steps[1:], dim=1))
        head_of = torch.tensor([heads.index(head) for head in groups], device=noise.device)
        return [noise, *torch.cat(chunks)[head_of].unbind(dim=1)]

    def _advance(self, denoiser, latents, i, cond, negative_cond, eta, generator):
        """Step `i` of the sampler for a batch of latents: one denoiser forward (CFG batched) and the step."""
        step_index = torch.full((latents.shape[0],), i, device=latents.device, dtype=torch.long)
        output = denoise(self.adapter, denoiser, latents, step_index, cond, negative_cond)
        return self.adapter.step(output, latents, step_index, eta, generator=generator)


Sampler = TrajectorySampler  # its earlier name
