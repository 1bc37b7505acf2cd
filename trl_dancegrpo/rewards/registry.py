"""The reward registry: names usable in `DanceGRPOTrainer(reward_funcs=[...])` and on the command line."""

import difflib
import importlib
import importlib.util
from collections.abc import Callable


# Nothing heavy is imported here: the command line checks reward names before torch is imported. Each built-in reward
# is imported from its module when it is first built.


def _import(module: str, attr: str):
    return getattr(importlib.import_module(module, __package__), attr)


def _builder(module: str, attr: str, **fixed) -> Callable[..., Callable]:
    """A factory calling the class or builder `attr` of the rewards' `module` (imported then) with its arguments."""
    return lambda **kwargs: _import(module, attr)(**fixed, **kwargs)


def _function(module: str, attr: str) -> Callable[..., Callable]:
    """A factory returning the plain reward function `attr` of the rewards' `module`, which takes no arguments."""

    def factory(**kwargs):
        if kwargs:
            raise ValueError(f"The reward {attr!r} takes no arguments, got {sorted(kwargs)}.")
        return _import(module, attr)

    return factory


REWARD_REGISTRY: dict[str, Callable[..., Callable]] = {
    "aesthetic": _builder(".image", "AestheticReward"),
    "audio_loudness": _function(".audio", "audio_loudness"),
    "brightness": _function(".simple", "brightness"),
    "clap_score": _builder(".audio", "CLAPScoreReward"),
    "clip_score": _builder(".image", "CLIPScoreReward"),
    "hpsv2": _builder(".image", "HPSReward", version="v2.0"),
    "hpsv2.1": _builder(".image", "HPSReward", version="v2.1"),
    "hpsv3": _builder(".hpsv3", "HPSv3Reward"),
    "imagereward": _builder(".imagereward", "ImageReward"),
    "jpeg_compressibility": _function(".simple", "jpeg_compressibility"),
    "jpeg_incompressibility": _function(".simple", "jpeg_incompressibility"),
    "ocr": _builder(".ocr", "OCRReward"),
    "pickscore": _builder(".image", "PickScoreReward"),
    "shapes_geneval": _function(".shapes", "shapes_geneval"),
    "shapes_geneval_dense": _function(".shapes", "shapes_geneval_dense"),
    "unifiedreward": _builder(".vlm", "unifiedreward_judge"),
    "videoalign_mq": _builder(".video", "VideoAlignReward", dimension="MQ"),
    "videoalign_ta": _builder(".video", "VideoAlignReward", dimension="TA"),
    "videoalign_vq": _builder(".video", "VideoAlignReward", dimension="VQ"),
    "vlm_instruction_following": _builder(".vlm", "instruction_following_judge"),
    "vlm_judge": _builder(".vlm", "VLMJudge"),
    "vqascore": _builder(".vlm", "vqascore_judge"),
}


def is_import_path(name: str) -> bool:
    """`my_pkg.my_module.my_reward`: two or more dot-separated identifiers (`HPSv2.1` is not one)."""
    parts = name.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def check_reward_name(name: str) -> None:
    """Raise a `ValueError` for a name that is neither registered nor an importable dotted path, with the registered
    names that come close (compared case-insensitively: `HPSv3` suggests `hpsv3`)."""
    if name in REWARD_REGISTRY:
        return
    lower = {known.lower(): known for known in REWARD_REGISTRY}
    close = [lower[match] for match in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    if name.lower() in lower:  # the same name but for its case comes first
        close = [lower[name.lower()], *(c for c in close if c != lower[name.lower()])]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    known = f"Known rewards: {', '.join(sorted(REWARD_REGISTRY))}"
    if is_import_path(name) and name.lower() not in lower:
        module = name.rpartition(".")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return  # a dotted path: get_reward imports it (and names what is missing)
        raise ValueError(
            f"Unknown reward {name!r}: it is not a registered name, and the module {module!r} of that import path "
            f"cannot be found (is it installed, or on PYTHONPATH?).{hint} {known}."
        )
    raise ValueError(
        f"Unknown reward {name!r}.{hint} {known}; or pass a dotted import path such as "
        "'my_package.my_module.my_reward'."
    )


def check_reward_kwargs_names(reward_funcs, reward_kwargs: dict | None) -> None:
    """Every key of `reward_kwargs` must be one of the reward names given in `reward_funcs`."""
    names_given = [func for func in reward_funcs if isinstance(func, str)]
    for name in reward_kwargs or {}:
        if name not in names_given:
            raise ValueError(
                f"reward_kwargs has an entry for {name!r}, which is not one of the rewards named in reward_funcs "
                f"({names_given}); the keys of reward_kwargs are reward names exactly as given in reward_funcs."
            )


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
    `jpeg_incompressibility`, `ocr`, `pickscore`, `shapes_geneval`, `shapes_geneval_dense`, `unifiedreward`,
    `videoalign_mq`, `videoalign_ta`, `videoalign_vq`, `vlm_instruction_following`, `vlm_judge`, `vqascore` (the VLM
    judges need `base_url=` and, except `unifiedreward`, `model=`).
    """
    check_reward_name(name)
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name](**kwargs)
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
