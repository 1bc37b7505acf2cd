"""trl-dancegrpo: DanceGRPO (GRPO on the stochastic sampler) for diffusers pipelines, with TRL ergonomics."""

import importlib


__version__ = "0.1.0.dev0"

__all__ = ["DanceGRPOConfig", "DanceGRPOTrainer", "compute_advantages"]

# Imported on first use: `python -m trl_dancegrpo` checks its options before torch and transformers are loaded.
_LAZY = {"DanceGRPOConfig": ".config", "DanceGRPOTrainer": ".trainer", "compute_advantages": ".objectives"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
