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


def make_algorithm(args, adapter, sampler) -> Algorithm:
    """The [`Algorithm`] named by `args.algorithm`, for the model family of `adapter`."""
    if args.algorithm == "nft":
        from .nft import NFT

        return NFT(args, adapter, sampler)
    if args.algorithm == "awm":
        from .awm import AWM

        return AWM(args, adapter, sampler)
    if args.algorithm == "grpo_guard":
        from .grpo_guard import GRPOGuard

        return GRPOGuard(args, adapter, sampler)
    from .grpo import GRPO

    return GRPO(args, adapter, sampler)


__all__ = ["Algorithm", "ForwardProcessAlgorithm", "make_algorithm"]
