"""The pure parts of the GRPO objective, as free functions: group-relative advantages, best-of-n, the per-step PPO-clip
loss, the KL term and the metric dicts logged from them.

Used by the trainer (`DanceGRPOTrainer._policy_step`) and by `estimate-memory` (`memory/estimate.py`), so the loss
whose memory is estimated is the loss that is trained. Nothing here touches a model.
"""

import torch


def compute_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    weights: torch.Tensor,
    aggregation: str = "normalize_then_sum",
    adv_clip_max: float | None = None,
) -> torch.Tensor:
    """Group-relative advantages from per-reward scores.

    Args:
        rewards (`torch.Tensor`): `[N, K]`, N samples in consecutive groups of `num_generations`, K rewards; NaN marks
            a score that does not count (not applicable, or a failed sample). NaN scores are left out of their group's
            statistics and contribute 0 to the advantage.
        num_generations (`int`): Group size G.
        weights (`torch.Tensor`): `[K]` reward weights.
        aggregation (`str`): `"normalize_then_sum"`: `A = sum_k w_k (r_k - mean_k) / (std_k + 1e-8)` with per-group,
            per-reward statistics (the paper); `"sum_then_normalize"`: the weighted sum is normalised per group.
        adv_clip_max (`float`, *optional*): Clamp to `[-adv_clip_max, adv_clip_max]`.

    Returns:
        `torch.Tensor`: `[N]` advantages, float32. Standard deviations are unbiased (as `torch.std`); a group with
        fewer than two valid scores for a reward gets 0 from it.
    """
    rewards = rewards.float()
    weights = weights.to(rewards)
    if aggregation == "sum_then_normalize":
        applicable = ~torch.isnan(rewards)
        total = (torch.nan_to_num(rewards) * weights).sum(dim=1, keepdim=True)
        total[~applicable.any(dim=1)] = float("nan")
        return compute_advantages(total, num_generations, torch.ones(1), "normalize_then_sum", adv_clip_max)
    grouped = rewards.view(-1, num_generations, rewards.shape[1])  # [groups, G, K]
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True)
    mean = torch.nansum(grouped, dim=1, keepdim=True) / count.clamp_min(1)
    centered = torch.where(valid, grouped - mean, torch.zeros_like(grouped))
    std = (centered.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    normalized = torch.where(valid & (count > 1), centered / (std + 1e-8), torch.zeros_like(grouped))
    advantages = (normalized * weights).sum(dim=2).view(-1)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages


def best_of_n_indices(advantages: torch.Tensor, num_generations: int, best_of_n: int) -> torch.Tensor:
    """Indices of the `best_of_n // 2` highest- and `best_of_n // 2` lowest-advantage samples of each group.

    `advantages` holds whole consecutive groups of `num_generations`; the indices come back in increasing order (ties
    keep the earlier sample).
    """
    k = best_of_n // 2
    grouped = advantages.view(-1, num_generations)
    order = torch.sort(grouped, dim=1, descending=True, stable=True).indices
    chosen = torch.cat([order[:, :k], order[:, -k:]], dim=1).sort(dim=1).values
    offsets = torch.arange(grouped.shape[0], device=advantages.device).unsqueeze(1) * num_generations
    return (chosen + offsets).flatten()


def clipped_policy_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip loss of one transition per sample: `max(-A * r, -A * clip(r, 1 - epsilon, 1 + epsilon))`.

    Args:
        log_prob (`torch.Tensor`): `[B]` log-probs of the stored transitions under the current policy.
        old_log_prob (`torch.Tensor`): `[B]` their log-probs at the rollout.
        advantages (`torch.Tensor`): `[B]` advantages.
        epsilon (`float`): Clip range.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: the `[B]` per-sample loss, the ratio `r` and its log.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon)
    return torch.maximum(-advantages * ratio, -advantages * clipped_ratio), ratio, log_ratio


def clipped_mask(ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Where the clip removes the gradient: the ratio is past the clip range on the side the advantage pushes to."""
    return ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std_dev: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between two Gaussian transitions of the same std: the squared mean distance over `2 std^2`.

    The squared distance is averaged over the non-batch dimensions (any tensor rank); `std_dev` is a scalar or `[B]`.
    """
    squared = (mean - ref_mean).pow(2).flatten(1).mean(1)
    return squared / (2 * std_dev.flatten().pow(2).expand_as(squared))


def policy_metrics(stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The logged metrics of one optimization pass, from the per-slice `ratio`, `log_ratio`, `clipped` (and `kl`)."""
    ratios = torch.cat(stats["ratio"])
    log_ratio = torch.cat(stats["log_ratio"])
    metrics = {
        "ratio/mean": ratios.mean().item(),
        "ratio/min": ratios.min().item(),
        "ratio/max": ratios.max().item(),
        "clip_ratio": torch.cat(stats["clipped"]).float().mean().item(),
        "approx_kl": ((log_ratio.exp() - 1) - log_ratio).mean().item(),
    }
    if stats.get("kl"):
        metrics["kl"] = torch.cat(stats["kl"]).mean().item()
    return metrics


def rollout_metrics(
    rewards: torch.Tensor,
    failed: torch.Tensor,
    advantages: torch.Tensor,
    reward_names: list[str],
    reward_weights: torch.Tensor,
    num_generations: int,
) -> dict[str, float]:
    """The logged metrics of one rollout: per-reward mean/std, the weighted reward, advantages, failed samples.

    `rewards` is `[N, K]` with NaN for a score that does not count; `failed` is `[N]` (bool).
    """
    metrics = {}
    for k, name in enumerate(reward_names):
        column = rewards[:, k]
        column = column[~torch.isnan(column)]
        if len(column):
            metrics[f"rewards/{name}/mean"] = column.mean().item()
            metrics[f"rewards/{name}/std"] = column.std().item() if len(column) > 1 else 0.0
    # a sample that no reward applies to (all None) has no reward: it is not logged as 0
    scored = ~failed & ~torch.isnan(rewards).all(dim=1)
    weighted = (torch.nan_to_num(rewards) * reward_weights).sum(dim=1)[scored]
    if len(weighted):
        metrics["reward"] = weighted.mean().item()
        grouped_std = torch.nan_to_num(rewards).mul(reward_weights).sum(1).view(-1, num_generations)
        metrics["reward_std"] = grouped_std.std(dim=1).mean().item()
    metrics["advantages/mean"] = advantages.mean().item()
    metrics["advantages/std"] = advantages.std().item()
    metrics["advantages/abs_mean"] = advantages.abs().mean().item()
    metrics["num_failed_samples"] = float(failed.sum().item())
    return metrics
