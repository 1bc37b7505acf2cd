"""trl-dancegrpo: DanceGRPO (GRPO on the stochastic sampler) for diffusers pipelines, with TRL ergonomics."""

from ._lazy import lazy_attributes


__version__ = "0.1.0.dev0"

__all__ = ["DanceGRPOConfig", "DanceGRPOTrainer", "compute_advantages"]

# Imported on first use: `python -m trl_dancegrpo` checks its options before torch and transformers are loaded.
__getattr__, __dir__ = lazy_attributes(
    __name__, {"DanceGRPOConfig": ".config", "DanceGRPOTrainer": ".trainer", "compute_advantages": ".objectives"}
)
