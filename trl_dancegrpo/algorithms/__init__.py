"""The objectives the trainer optimizes, one module each: what the rollout keeps, how it samples, the loss.

The trainer owns everything the objectives share (one rollout loop, one reward and advantage path, checkpoints,
logging) and calls its [`Algorithm`] at three points: the options of the rollout (`rollout_options`), the per-sample
tensors kept from it (`rollout_batch`), and the loss of one trained step of a slice of samples (`step_loss`).

- `grpo.py`: DanceGRPO's PPO-clip loss on the stochastic sampler's transitions (`objectives.py` holds its math).
- `grpo_guard.py`: GRPO-Guard (arXiv 2510.22319), GRPO with a normalized ratio and a `1 / dt` reweighting.
- `nft.py`: DiffusionNFT (arXiv 2509.16117), on the forward process, contrasting implicit positive/negative policies.
- `awm.py`: Advantage Weighted Matching (arXiv 2509.25050), the advantage-weighted flow-matching loss.
"""

from .base import Algorithm, ForwardProcessAlgorithm


def algorithm_class(name: str) -> type[Algorithm]:
    """The [`Algorithm`] class of `DanceGRPOConfig.algorithm` `name`."""
    if name == "nft":
        from .nft import NFT

        return NFT
    if name == "awm":
        from .awm import AWM

        return AWM
    if name == "grpo_guard":
        from .grpo_guard import GRPOGuard

        return GRPOGuard
    from .grpo import GRPO

    return GRPO


def make_algorithm(args, adapter, sampler) -> Algorithm:
    """The [`Algorithm`] named by `args.algorithm`, for the model family of `adapter` (which `models.make_adapter`
    has checked with its `check_adapter`)."""
    return algorithm_class(args.algorithm)(args, adapter, sampler)


__all__ = ["Algorithm", "ForwardProcessAlgorithm", "algorithm_class", "make_algorithm"]
