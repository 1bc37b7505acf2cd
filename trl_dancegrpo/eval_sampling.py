"""Deterministic samples of a prompt set, scored by the rewards: shared by `DanceGRPOTrainer.evaluate` and
`trl-dancegrpo evaluate` (`evaluation.py`). Takes the trainer as an argument and imports neither it nor the command."""

import math
from dataclasses import dataclass


@dataclass
class EvalSamples:
    """What `sample_and_score` returns (the same on every process).

    Attributes:
        rewards: `[N * M, K]` float tensor, sample `i * M + j` = image `j` of prompt `i`; NaN where a reward returned
            None.
        thumbnails: `[N * M, 3, h, w]` uint8 thumbnails (videos: the middle frame), or None when not asked for.
        first_sample: the first sample of this process at full size (for the trainer's logged sample).
    """

    rewards: "torch.Tensor"  # noqa: F821
    thumbnails: "torch.Tensor | None"  # noqa: F821
    first_sample: "torch.Tensor"  # noqa: F821


def _thumbnail(images, size: int):
    import torch

    if images.ndim == 5:  # videos: the middle frame
        images = images[:, images.shape[1] // 2]
    scale = size / max(images.shape[-2:])
    if scale < 1:
        shape = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
        images = torch.nn.functional.interpolate(images.float(), size=shape, mode="bilinear", antialias=True)
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def sample_and_score(
    trainer,
    rows: list[dict],
    num_images_per_prompt: int = 1,
    seed: int | None = None,
    thumbnail_size: int | None = None,
    progress: bool = False,
    description: str = "evaluate",
) -> EvalSamples:
    """Sample every row `num_images_per_prompt` times (eta = 0) with the trainer's model and score the samples.

    Sample `i * M + j` (image `j` of row `i`) starts from the noise of global index `i * M + j` under `seed` (default
    `trainer.args.seed`), whatever the number of processes: each process takes a contiguous block of the samples (the
    last padded with repeats, so every process runs the same number of batches), in batches of
    `per_device_eval_batch_size`, and the rewards are gathered. A collective: every process calls it.
    """
    import torch
    from tqdm.auto import tqdm

    from .parallel import DataParallelLayout

    accelerator = trainer.accelerator
    seed = trainer.args.seed if seed is None else seed
    samples = [row for row in rows for _ in range(num_images_per_prompt)]
    total = len(samples)
    # a context-parallel group samples together: the samples split over the data-parallel groups
    layout = getattr(trainer, "data_parallel", None) or DataParallelLayout(accelerator)
    rank, world = layout.rank, layout.size
    per_process = math.ceil(total / world)
    start = rank * per_process
    local = [samples[i % total] for i in range(start, start + per_process)]
    batch = trainer.args.per_device_eval_batch_size
    rewards, thumbnails, first_sample = [], [], None
    bar = tqdm(total=total, desc=description, unit="sample", disable=not progress or not accelerator.is_main_process)
    for offset in range(0, per_process, batch):
        part = local[offset : offset + batch]
        prompts = [row["prompt"] for row in part]
        images, trajectory = trainer.generate(
            prompts,
            seed=seed,
            eta=0.0,
            images=[row.get(trainer.adapter.conditioning_column) for row in part],
            first=start + offset,
        )
        if first_sample is None:
            first_sample = images[0].detach().cpu()
        rewards.append(trainer._score(prompts, images, part, trajectory.extras)[0].float().cpu())
        if thumbnail_size is not None:
            thumbnails.append(_thumbnail(images.detach().cpu(), thumbnail_size))
        bar.update(min(len(part) * world, total - bar.n))
    bar.close()
    device = accelerator.device
    gathered = layout.gather(torch.cat(rewards).to(device)).cpu()[:total]
    gathered_thumbnails = None
    if thumbnail_size is not None:
        gathered_thumbnails = layout.gather(torch.cat(thumbnails).to(device)).cpu()[:total]
    return EvalSamples(gathered, gathered_thumbnails, first_sample)


def summarize(rewards, reward_names: list[str], categories: list | None = None) -> dict[str, float | None]:
    """Each reward's mean over the samples (`None`s left out); with `categories` (one per sample), each category's
    mean as `"<reward>/<category>"` and their unweighted mean as `"<reward>/mean_over_categories"`."""
    import torch

    def mean(values) -> float | None:
        values = values[~torch.isnan(values)]
        return values.double().mean().item() if len(values) else None

    metrics = {}
    for k, name in enumerate(reward_names):
        metrics[name] = mean(rewards[:, k])
        if categories is None:
            continue
        per_category = {}
        for category in dict.fromkeys(categories):
            mask = torch.tensor([c == category for c in categories])
            per_category[str(category)] = mean(rewards[mask, k])
        for category, value in per_category.items():
            metrics[f"{name}/{category}"] = value
        values = [v for v in per_category.values() if v is not None]
        metrics[f"{name}/mean_over_categories"] = sum(values) / len(values) if values else None
    return metrics
