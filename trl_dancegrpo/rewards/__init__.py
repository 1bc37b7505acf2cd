"""Reward functions: a name registry plus the built-in rewards.

A reward is any callable `f(prompts, images, **kwargs) -> list[float | None]` where `images` is a float tensor in
[0, 1] of shape `(N, 3, H, W)` (videos: `(N, F, 3, H, W)`), and dataset columns arrive as keyword arguments.
`None` means "not applicable" for that sample.
"""

import importlib
from collections.abc import Callable

import torch


def brightness(prompts, images, **kwargs) -> list[float]:
    """Mean pixel value of each image (or video) in [0, 1]: a weight-free reward for tests and demos."""
    return images.float().flatten(1).mean(dim=1).tolist()


REWARD_REGISTRY: dict[str, Callable[[], Callable]] = {
    "brightness": lambda: brightness,
}


def get_reward(name: str, **kwargs) -> Callable:
    """Return the reward callable registered as `name`, or import it from a dotted path such as `my_pkg.my_reward`.

    Keyword arguments are passed to the constructor of class-based rewards.
    """
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name](**kwargs)
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            obj = getattr(module, attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"Could not import the reward {name!r}: {error}") from error
        if isinstance(obj, type):
            obj = obj(**kwargs)
        if not callable(obj):
            raise ValueError(f"The reward {name!r} is not callable.")
        return obj
    raise ValueError(
        f"Unknown reward {name!r}. Known rewards: {', '.join(sorted(REWARD_REGISTRY))}; "
        "or pass a dotted import path such as 'my_package.my_module.my_reward'."
    )


__all__ = ["REWARD_REGISTRY", "brightness", "get_reward"]
