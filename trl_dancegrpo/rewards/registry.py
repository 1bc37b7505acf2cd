"""The reward registry: names usable in `DanceGRPOTrainer(reward_funcs=[...])` and on the command line."""

import importlib
from collections.abc import Callable

from .hpsv3 import HPSv3Reward
from .image import AestheticReward, CLIPScoreReward, HPSReward, PickScoreReward
from .imagereward import ImageReward
from .shapes import shapes_geneval, shapes_geneval_dense
from .simple import brightness, jpeg_compressibility, jpeg_incompressibility
from .video import VideoAlignReward
from .vlm import VLMJudge, instruction_following_judge, unifiedreward_judge, vqascore_judge


def _plain(function: Callable) -> Callable[..., Callable]:
    def factory(**kwargs):
        if kwargs:
            raise ValueError(f"The reward {function.__name__!r} takes no arguments, got {sorted(kwargs)}.")
        return function

    return factory


def _videoalign(dimension: str) -> Callable[..., VideoAlignReward]:
    return lambda **kwargs: VideoAlignReward(dimension=dimension, **kwargs)


REWARD_REGISTRY: dict[str, Callable[..., Callable]] = {
    "aesthetic": AestheticReward,
    "brightness": _plain(brightness),
    "clip_score": CLIPScoreReward,
    "hpsv2": lambda **kwargs: HPSReward(version="v2.0", **kwargs),
    "hpsv2.1": lambda **kwargs: HPSReward(version="v2.1", **kwargs),
    "hpsv3": HPSv3Reward,
    "imagereward": ImageReward,
    "jpeg_compressibility": _plain(jpeg_compressibility),
    "jpeg_incompressibility": _plain(jpeg_incompressibility),
    "pickscore": PickScoreReward,
    "shapes_geneval": _plain(shapes_geneval),
    "shapes_geneval_dense": _plain(shapes_geneval_dense),
    "unifiedreward": unifiedreward_judge,
    "videoalign_mq": _videoalign("MQ"),
    "videoalign_ta": _videoalign("TA"),
    "videoalign_vq": _videoalign("VQ"),
    "vlm_instruction_following": instruction_following_judge,
    "vlm_judge": VLMJudge,
    "vqascore": vqascore_judge,
}


def register_reward(name: str, factory: Callable[..., Callable], overwrite: bool = False) -> None:
    """Make `get_reward(name)` return `factory(**kwargs)`: a reward class, or a function building the reward.

    Args:
        name (`str`):
            Registry name (looked up before dotted import paths).
        factory (`Callable`):
            Called with `get_reward`'s keyword arguments; returns the reward callable.
        overwrite (`bool`, *optional*, defaults to `False`):
            Whether replacing an existing name is allowed.
    """
    if name in REWARD_REGISTRY and not overwrite:
        raise ValueError(f"A reward named {name!r} is already registered; pass overwrite=True to replace it.")
    REWARD_REGISTRY[name] = factory


def get_reward(name: str, **kwargs) -> Callable:
    """Return the reward callable registered as `name`, or import it from a dotted path such as `my_pkg.my_reward`.

    Keyword arguments are passed to the constructor of class-based rewards (e.g.
    `get_reward("hpsv2.1", checkpoint_path="HPS_v2.1_compressed.pt")`). Registered names:
    `aesthetic`, `brightness`, `clip_score`, `hpsv2`, `hpsv2.1`, `hpsv3`, `imagereward`, `jpeg_compressibility`,
    `jpeg_incompressibility`, `pickscore`, `shapes_geneval`, `shapes_geneval_dense`, `unifiedreward`, `videoalign_mq`,
    `videoalign_ta`, `videoalign_vq`, `vlm_instruction_following`, `vlm_judge`, `vqascore` (the VLM judges need
    `base_url=` and, except `unifiedreward`, `model=`).
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
