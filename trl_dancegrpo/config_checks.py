"""Checks of single [`DanceGRPOConfig`] values that need neither torch nor transformers.

`DanceGRPOConfig.__post_init__` runs them first, and the command line runs them on the parsed options before it
imports anything heavy, so a wrong value is reported in a fraction of a second (see `cli_checks.py`). Checks that
need the number of processes or the device stay in `DanceGRPOConfig.__post_init__`.

The checks of the datasets (`check_dataset`, `check_image_column`) are here too: the trainer's constructor runs them
before it loads the pipeline (the image column: right after, once the adapter says whether images are needed).
"""

import json
import math
import os
import warnings


AGGREGATIONS = ("normalize_then_sum", "sum_then_normalize")
GUARD_SDE_TYPES = ("dancegrpo", "flow_grpo")  # the steps GRPO-Guard applies to (see algorithms/grpo_guard.py)
ALGORITHMS = ("grpo", "grpo_guard", "nft", "awm")
AWM_WEIGHTINGS = ("uniform", "sigma", "sigma_squared", "ghuber")
# Each algorithm's own options (unset: `None`) and their defaults, filled in by `resolve_algorithm_options` for the chosen
# algorithm; set with another algorithm they are refused (they would be silently ignored).
ALGORITHM_OPTION_DEFAULTS = {
    "guard_gradient_reweighting": ("grpo_guard", True),
    "nft_beta": ("nft", 1.0),
    "awm_weighting": ("awm", "ghuber"),
    "awm_ghuber_power": ("awm", 0.25),
    "awm_clip_range": ("awm", 1.0),
}
ALGORITHM_OPTIONS = {name: owner for name, (owner, _) in ALGORITHM_OPTION_DEFAULTS.items()}
FORWARD_PROCESS_ALGORITHMS = ("nft", "awm")  # they sample with the deterministic solver and keep no trajectory
SDE_TYPES = ("dancegrpo", "flow_grpo", "cps")
WINDOW_SCHEDULES = ("random", "sliding")
CONTEXT_PARALLEL_TYPES = ("ulysses", "ring")


def parse_reward_kwargs(value) -> dict[str, dict] | None:
    """`reward_kwargs` as a dict of dicts: a mapping (Python, YAML) or its JSON text (command line)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"reward_kwargs must be a JSON object mapping reward names to keyword arguments, e.g. "
                f'\'{{"hpsv2.1": {{"checkpoint_path": "/models/HPS_v2.1_compressed.pt"}}}}\'; got {value!r} ({error}).'
            ) from None
    if not isinstance(value, dict) or not all(isinstance(kwargs, dict) for kwargs in value.values()):
        raise ValueError(
            "reward_kwargs must map each reward name (as given in reward_funcs) to a dict of keyword arguments, e.g. "
            f'{{"hpsv2.1": {{"checkpoint_path": "/models/HPS_v2.1_compressed.pt"}}}}; got {value!r}.'
        )
    return {str(name): dict(kwargs) for name, kwargs in value.items()}


def check_reward_weights_count(reward_weights, num_rewards: int) -> None:
    """One weight per reward function (or none: all 1)."""
    if reward_weights is not None and len(reward_weights) != num_rewards:
        raise ValueError(
            f"reward_weights has {len(reward_weights)} entries but there are {num_rewards} reward functions; give one "
            "weight per reward function."
        )


def check_ema(args) -> None:
    """The EMA options: a decay in (0, 1), and the other EMA options only with one."""
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise ValueError(
            f"ema_decay must be in (0, 1) (the official DanceGRPO scripts use 0.995), got {args.ema_decay}; None "
            "keeps no EMA."
        )
    if args.ema_start_step < 0:
        raise ValueError(f"ema_start_step must be >= 0, got {args.ema_start_step}.")
    if args.ema_decay is None:
        given = [name for name in ("ema_on_cpu", "eval_with_ema") if getattr(args, name)]
        given += ["ema_start_step"] if args.ema_start_step else []
        if given:
            raise ValueError(f"{', '.join(given)} set without ema_decay: set ema_decay (e.g. 0.995) to keep an EMA.")


def check_algorithm(args) -> None:
    """The algorithm and its options; the GRPO-only options are refused with the forward-process objectives."""
    if args.algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {args.algorithm!r}.")
    if args.algorithm == "grpo_guard" and args.sde_type not in GUARD_SDE_TYPES:
        raise ValueError(
            f"algorithm='grpo_guard' is defined for the flow SDE step (sde_type in {list(GUARD_SDE_TYPES)}), got "
            f"sde_type={args.sde_type!r}: CPS's noise level does not scale with sqrt(-dt), so GRPO-Guard's ratio "
            "normalization and 1/dt reweighting do not hold for it. Use sde_type='flow_grpo' (the paper's) or "
            "'dancegrpo', or algorithm='grpo' with CPS."
        )
    foreign = [
        name
        for name, owner in ALGORITHM_OPTIONS.items()
        if getattr(args, name, None) is not None and owner != args.algorithm
    ]
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)} set with algorithm={args.algorithm!r}: "
            + "; ".join(f"{name} belongs to algorithm={ALGORITHM_OPTIONS[name]!r}" for name in foreign)
            + ". Leave it unset, or choose that algorithm."
        )
    if args.nft_beta is not None and args.nft_beta <= 0:
        raise ValueError(f"nft_beta must be > 0 (DiffusionNFT uses 1.0), got {args.nft_beta}.")
    if args.awm_weighting is not None and args.awm_weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"awm_weighting must be one of {AWM_WEIGHTINGS}, got {args.awm_weighting!r}.")
    if args.awm_ghuber_power is not None and args.awm_ghuber_power <= 0:
        raise ValueError(f"awm_ghuber_power must be > 0 (AWM's recipe uses 0.25), got {args.awm_ghuber_power}.")
    if args.awm_clip_range is not None and args.awm_clip_range <= 0:
        raise ValueError(f"awm_clip_range must be > 0 (AWM's recipe uses 1.0), got {args.awm_clip_range}.")
    if getattr(args, "sample_with_ema", False):
        if args.algorithm not in FORWARD_PROCESS_ALGORITHMS:
            raise ValueError(
                f"sample_with_ema is for algorithm 'nft' or 'awm' (their off-policy sampling), got {args.algorithm!r}: "
                "GRPO's log-probs must come from the weights being trained."
            )
        if args.ema_decay is None:
            raise ValueError("sample_with_ema needs an EMA: set ema_decay (Flow-Factory's NFT recipe uses 0.5).")
    if args.algorithm not in FORWARD_PROCESS_ALGORITHMS:
        return
    grpo_only = {
        "eta": args.eta is not None,
        "sde_type": args.sde_type != "dancegrpo",
        "sde_window_size": args.sde_window_size is not None,
        "best_of_n": getattr(args, "best_of_n", None) is not None,
        "beta": args.beta > 0,
    }
    given = [name for name, set_ in grpo_only.items() if set_]
    if given:
        raise ValueError(
            f"{', '.join(given)} set with algorithm={args.algorithm!r}: these options belong to algorithm='grpo' (its "
            f"stochastic sampler and loss); {args.algorithm} samples with the deterministic solver and has no KL term. "
            "Leave them unset, or use algorithm='grpo'."
        )


def resolve_algorithm_options(args) -> None:
    """Fill the chosen algorithm's unset options (`None`) with their defaults (`ALGORITHM_OPTION_DEFAULTS`)."""
    for name, (owner, default) in ALGORITHM_OPTION_DEFAULTS.items():
        if owner == args.algorithm and getattr(args, name) is None:
            setattr(args, name, default)


def check_values(args) -> None:
    """Raise a `ValueError` naming the first option (attribute of `args`) whose value is out of range."""
    if args.num_generations < 2:
        raise ValueError(
            f"num_generations must be at least 2 (got {args.num_generations}): group-relative advantages need "
            "several samples of each prompt."
        )
    if args.per_device_train_batch_size is not None and args.per_device_train_batch_size < 1:
        raise ValueError(
            f"per_device_train_batch_size must be at least 1 (got {args.per_device_train_batch_size}); it counts the "
            "samples (not prompts) of one micro-step on each device."
        )
    if not 0 < args.timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {args.timestep_fraction}.")
    if args.num_inference_steps < 2:
        raise ValueError(
            f"num_inference_steps must be at least 2, got {args.num_inference_steps}: the last step is "
            "deterministic (the clean image), so one step leaves nothing to train."
        )
    if args.context_parallel_size < 1:
        raise ValueError(
            f"context_parallel_size must be at least 1 (got {args.context_parallel_size}); 1 turns context "
            "parallelism off."
        )
    if args.context_parallel_type not in CONTEXT_PARALLEL_TYPES:
        raise ValueError(
            f"context_parallel_type must be one of {CONTEXT_PARALLEL_TYPES}, got {args.context_parallel_type!r}."
        )
    if args.sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {args.sde_type!r}.")
    if args.eta is not None and args.eta <= 0:
        raise ValueError(
            f"eta must be > 0 or None (got {args.eta}): with a deterministic sampler the transitions have no log-prob."
        )
    if args.sde_type == "cps" and args.eta is not None and args.eta > 1:
        raise ValueError(
            f"With sde_type='cps', eta is in (0, 1] (std = sigma_next * sin(eta * pi / 2)), got {args.eta}."
        )
    if args.epsilon <= 0:
        raise ValueError(f"epsilon (the clip range) must be > 0, got {args.epsilon}.")
    if args.adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {args.adv_clip_max}.")
    if args.beta < 0:
        raise ValueError(f"beta must be >= 0, got {args.beta}.")
    if args.shift is not None and args.shift <= 0:
        raise ValueError(f"shift must be > 0 or None, got {args.shift}.")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 or None, got {args.guidance_scale}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise ValueError(f"{name} must be a positive multiple of 16, got {value}.")
    if args.multi_objective_aggregation not in AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {args.multi_objective_aggregation!r}."
        )
    check_ema(args)
    check_algorithm(args)
    if args.num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {args.num_iterations}.")
    if args.rollout_batch_size is not None and args.rollout_batch_size < 1:
        raise ValueError(f"rollout_batch_size must be a positive integer or None, got {args.rollout_batch_size}.")
    if args.num_frames is not None and args.num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer or None, got {args.num_frames}.")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(
            f"strength must be in (0, 1] (the share of the steps run on the noised source), got {strength}."
        )
    experts = getattr(args, "train_experts", None)
    if experts is not None and (not experts or set(experts) - {"transformer", "transformer_2"}):
        raise ValueError(
            f"train_experts={experts}: give one or both of 'transformer' (high noise) and 'transformer_2' (low "
            "noise), or None for both."
        )
    check_reward_values(args)


def check_sde_window(args) -> list[int] | None:
    """Check the SDE window settings; returns the window's range `[start, end)` when a window is set, else `None`."""
    trainable = args.num_inference_steps - 1  # the last step is deterministic
    if args.sde_window_schedule not in WINDOW_SCHEDULES:
        raise ValueError(f"sde_window_schedule must be one of {WINDOW_SCHEDULES}, got {args.sde_window_schedule!r}.")
    if args.sde_window_interval < 1:
        raise ValueError(f"sde_window_interval must be at least 1, got {args.sde_window_interval}.")
    if args.sde_window_size is None:
        if args.sde_window_range is not None:
            raise ValueError("sde_window_range is set but sde_window_size is not: set the window's size too.")
        return None
    start, end = args.sde_window_range if args.sde_window_range is not None else (0, trainable)
    if args.sde_window_range is not None and (len(args.sde_window_range) != 2 or not 0 <= start < end <= trainable):
        raise ValueError(
            f"sde_window_range must be [start, end) with 0 <= start < end <= num_inference_steps - 1 = {trainable} "
            f"(the last step is never stochastic), got {args.sde_window_range}."
        )
    if not 1 <= args.sde_window_size <= end - start:
        raise ValueError(
            f"sde_window_size must be from 1 to the size of sde_window_range [{start}, {end}) = {end - start}, got "
            f"{args.sde_window_size}; lower it or widen the range (num_inference_steps {args.num_inference_steps})."
        )
    return [start, end]


def check_reward_values(args) -> None:
    if args.reward_weights is not None:
        for i, weight in enumerate(args.reward_weights):
            if not math.isfinite(weight):
                raise ValueError(
                    f"reward_weights[{i}] is {weight}; every reward weight must be a finite number (an infinite weight "
                    "pins every advantage to +-adv_clip_max)."
                )
        zero = [i for i, weight in enumerate(args.reward_weights) if weight == 0]
        if zero:
            warnings.warn(
                f"reward_weights{zero} is 0: that reward is computed and logged but does not affect training.",
                stacklevel=3,
            )
    if args.reward_timeout is not None and not args.reward_timeout > 0:
        raise ValueError(f"reward_timeout must be a number of seconds > 0 or None, got {args.reward_timeout}.")
    if args.reward_retries < 0:
        raise ValueError(f"reward_retries must be >= 0, got {args.reward_retries}.")
    parse_reward_kwargs(args.reward_kwargs)


# -- datasets ------------------------------------------------------------------------------------------------------
def _first_null(column) -> int:
    import pyarrow.compute as pc

    return pc.index(pc.is_null(column), True).as_py()


def check_dataset(dataset, name: str, args) -> None:
    """A training or evaluation dataset (`name`) the trainer can use: a `datasets.Dataset` with string prompts, enough
    distinct prompts for one rollout (`args`: the `DanceGRPOConfig`). `None` passes."""
    if dataset is None:
        return
    if isinstance(dataset, dict) and all(hasattr(split, "column_names") for split in dataset.values()):
        raise TypeError(
            f"{name} is a DatasetDict with the splits {sorted(dataset)}: pick a split, e.g. "
            f"dataset[{next(iter(dataset), 'train')!r}] (load_dataset(..., split='train'))."
        )
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "column_names"):
        raise TypeError(f"{name} must be a datasets.Dataset with a 'prompt' column, got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it needs at least one prompt.")
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {dataset.column_names}); rename the prompt column to "
            "'prompt', e.g. dataset.rename_column('caption', 'prompt')."
        )
    _check_prompts(dataset, name)
    needed = args.generation_batch_size // args.num_generations
    if name == "train_dataset" and len(dataset) < needed:
        raise ValueError(
            f"train_dataset has {len(dataset)} prompts but one rollout uses {needed} distinct prompts "
            f"(generation batch {args.generation_batch_size} / num_generations {args.num_generations}); add "
            "prompts or lower per_device_train_batch_size."
        )


def _check_prompts(dataset, name: str) -> None:
    """Every prompt a string: a None or a number found now, with its row, not when that row is sampled hours in."""
    if hasattr(dataset, "with_format"):
        import pyarrow as pa

        column = dataset.with_format("arrow")["prompt"]  # Arrow data: the column's type settles most cases
        if column.null_count:
            raise ValueError(f"Row {_first_null(column)} of {name} has no prompt (its 'prompt' is None).")
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return
        prompts = column.to_pylist()
    else:
        prompts = [row["prompt"] for row in dataset]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(
                f"Row {i} of {name} has the prompt {prompt!r} ({type(prompt).__name__}); prompts must be strings."
            )


def check_image_column(dataset, name: str, adapter) -> None:
    """Image-to-video and editing rows need an `image` (PIL image, path or tensor), video-to-video rows a `video`
    (frames or a video file path): the column, no empty entry, no missing file."""
    if dataset is None or not adapter.requires_image:
        return
    key = adapter.conditioning_column
    pipeline = type(adapter.pipeline).__name__
    if key not in dataset.column_names:
        what = "frames or a video file path" if key == "video" else "PIL images, paths or tensors"
        raise ValueError(
            f"{pipeline} is {adapter.task}: {name} needs {'an' if key == 'image' else 'a'} '{key}' column ({what}) "
            f"next to 'prompt'; its columns are {dataset.column_names}."
        )
    if not hasattr(dataset, "with_format"):
        return
    import pyarrow as pa

    column = dataset.with_format("arrow")[key]  # Arrow data: nothing is decoded for these checks
    if column.null_count:
        raise ValueError(f"Row {_first_null(column)} of {name} has no {key} (its '{key}' is None).")
    kind = column.type
    several = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and not pa.types.is_list(kind.value_type)
    if key == "image" and several:  # lists of images (or of paths); a list of lists is an image array
        raise ValueError(
            f"The 'image' column of {name} holds several images per row; {pipeline} takes one conditioning image per "
            "row."
        )
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        for i, path in enumerate(column.to_pylist()):
            if not os.path.isfile(path):
                raise ValueError(f"Row {i} of {name}: the {key} file {path!r} does not exist.")


def check_context_parallel(size: int, world_size: int, kind: str, device_type: str) -> None:
    """The launched processes must split into whole context-parallel groups; ring attention needs CUDA."""
    if size > 1 and kind == "ring" and device_type == "cpu":
        raise ValueError(
            "context_parallel_type='ring' needs an attention kernel that returns the log-sum-exp, which diffusers has "
            "on CUDA only (its native CPU attention returns none): use context_parallel_type='ulysses' on the CPU."
        )
    if world_size % size:
        raise ValueError(
            f"context_parallel_size ({size}) must divide the number of processes ({world_size}): each group of "
            f"{size} consecutive processes shares its samples. Launch a multiple of {size} processes or change "
            "context_parallel_size."
        )
