"""trl-dancegrpo: DanceGRPO (GRPO on the stochastic sampler) for diffusers pipelines, with TRL ergonomics."""

from .config import DanceGRPOConfig
from .trainer import DanceGRPOTrainer, compute_advantages


__version__ = "0.1.0.dev0"

__all__ = ["DanceGRPOConfig", "DanceGRPOTrainer", "compute_advantages"]
