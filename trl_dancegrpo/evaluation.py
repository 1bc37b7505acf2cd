"""`trl-dancegrpo evaluate`: deterministic samples of a prompt set, scored by rewards, base and trained side by side.

    trl-dancegrpo evaluate --model_name_or_path black-forest-labs/FLUX.1-dev --dataset_name prompts.jsonl \\
        --reward_funcs hpsv2.1 clip_score --adapter flux-dancegrpo --output_dir flux-eval
    accelerate launch -m trl_dancegrpo evaluate ...   # the prompts split across the processes

Every prompt is sampled `num_images_per_prompt` times with the deterministic sampler (eta = 0) from noise fixed by
`--seed` and the sample's index, so a rerun, or a run on another number of processes, draws the same images. The same
code scores the trainer's evaluation (`DanceGRPOTrainer.evaluate`). Writes into `--output_dir`:

- `metrics.json`: `{"base": {...}, "adapter": {...}}` (with `--tuned_model_name_or_path` also `"tuned"`, a second
  pipeline), each the mean of every reward, and where the prompts have a `category` column also
  `"<reward>/<category>"` (the category's mean) and `"<reward>/mean_over_categories"` (the unweighted mean of the
  categories' means, as GenEval reports its overall score);
- `samples.csv`: one row per sample (prompt, category, image index, every model's every reward);
- `grid.png`: the first samples, one row each, one column per model (labelled above).
"""

import argparse
import csv
import functools
import json
import math
import os
import re
import sys

# Nothing heavy at the top: the options are checked before torch, diffusers or any model is imported.
from .eval_sampling import EvalSamples, sample_and_score, summarize  # noqa: F401 (re-exported)


BASE_LABEL, ADAPTER_LABEL, TUNED_LABEL = "base", "adapter", "tuned"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# DanceGRPOConfig fields the command passes on when given (unset: DanceGRPOConfig's defaults)
SAMPLING_OPTIONS = {
    "num_inference_steps": (int, "Sampler steps (default: DanceGRPOConfig's, 16)."),
    "height": (int, "Image height (default: the model family's)."),
    "width": (int, "Image width (default: the model family's)."),
    "num_frames": (int, "Frames per video (video models; default: the family's)."),
    "guidance_scale": (float, "Guidance scale (default: the model family's)."),
    "shift": (float, "Timestep shift (default: the model family's)."),
    "per_device_eval_batch_size": (int, "Samples per denoiser batch on each process (default: 8)."),
    "reward_timeout": (float, "Seconds each reward call may take (default: no limit)."),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-dancegrpo evaluate",
        description="Sample a prompt set with the deterministic sampler (eta 0) at fixed seeds, score it with rewards, "
        "and write metrics.json, samples.csv and grid.png into --output_dir. With --adapter, the base model and the "
        "trained weights side by side. Under `accelerate launch` the prompts are split across the processes.",
        allow_abbrev=False,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True, help="Pipeline Hub id or local path; tiny-flux/tiny-sd.")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    model.add_argument(
        "--adapter",
        default=None,
        help="A local folder saved by the trainer: a LoRA (pytorch_lora_weights.safetensors) or a fully fine-tuned "
        "denoiser (config.json + weights). Evaluated next to the base model, labelled 'adapter'.",
    )
    model.add_argument(
        "--tuned_model_name_or_path",
        default=None,
        help="A second pipeline (Hub id or local path) evaluated after the first, labelled 'tuned'.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        default=None,
        help="Hub dataset id or local .txt/.json/.jsonl/.csv/.parquet file with a 'prompt' column (and optionally "
        "'category'); default: a few built-in prompts.",
    )
    data.add_argument("--dataset_config", default=None, help="Dataset configuration name.")
    data.add_argument(
        "--dataset_split", "--dataset_train_split", dest="dataset_split", default="train", help="Split to evaluate."
    )
    data.add_argument("--max_prompts", type=int, default=None, help="Evaluate only the first N prompts.")
    rewards = parser.add_argument_group("rewards")
    rewards.add_argument(
        "--reward_funcs",
        nargs="+",
        default=["brightness"],
        help="Reward registry names or dotted import paths (my_pkg.my_reward).",
    )
    rewards.add_argument("--reward_kwargs", default=None, help='JSON: \'{"hpsv2.1": {"checkpoint_path": "..."}}\'.')
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, default=42, help="Seed of the initial noise (default: 42).")
    sampling.add_argument("--num_images_per_prompt", type=int, default=1, help="Samples per prompt (default: 1).")
    for name, (kind, help_text) in SAMPLING_OPTIONS.items():
        sampling.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    sampling.add_argument("--bf16", action="store_true", help="Frozen components and LoRA in bfloat16.")
    sampling.add_argument("--fp16", action="store_true", help="Frozen components and LoRA in float16.")
    sampling.add_argument("--offload_text_encoders", action="store_true", help="Text encoders wait on the CPU.")
    sampling.add_argument("--offload_reward_models", action="store_true", help="Reward models wait on the CPU.")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", default="dancegrpo-eval", help="Where the results go (default: dancegrpo-eval)."
    )
    output.add_argument("--grid_rows", type=int, default=16, help="Samples shown in grid.png (default: 16).")
    output.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return parser


# -- checks before anything heavy is imported ---------------------------------------------------------------------------
def check_adapter(path: str | None, option: str = "--adapter") -> None:
    if path is None:
        return
    if not os.path.isdir(path):
        raise ValueError(f"{option} {path}: no such folder (a folder the trainer saved: a LoRA or a denoiser).")
    if not os.path.isfile(os.path.join(path, LORA_WEIGHTS)) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{option} {path}: the folder holds neither a LoRA ({LORA_WEIGHTS}) nor a denoiser (config.json and its "
            "weights); pass the output_dir (or a checkpoint-N folder) of a training run."
        )


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any model (or torch) is loaded; raises `ValueError` naming the option."""
    from .cli_checks import check_dataset_name, looks_like_a_file
    from .config_checks import parse_reward_kwargs
    from .rewards.registry import check_reward_kwargs_names, check_reward_name

    for name in ("num_images_per_prompt", "grid_rows", "max_prompts", "num_inference_steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "grid_rows" else 1):
            raise ValueError(f"--{name} must be positive, got {value}.")
    per_device = args.per_device_eval_batch_size
    if per_device is not None and per_device < 1:
        raise ValueError(f"--per_device_eval_batch_size must be positive, got {per_device}.")
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive: choose one.")
    for name in args.reward_funcs:  # the training command line's checks (nothing heavy imported)
        check_reward_name(name)
    check_reward_kwargs_names(args.reward_funcs, parse_reward_kwargs(args.reward_kwargs))
    check_dataset_name(args.dataset_name)
    check_adapter(args.adapter)
    for option in ("model_name_or_path", "tuned_model_name_or_path"):
        model = getattr(args, option)
        if model is not None and not os.path.exists(os.path.expanduser(model)) and looks_like_a_file(model):
            raise ValueError(f"--{option} {model}: no such folder (a local pipeline, or a Hub id 'org/name').")
    check_output_dir(args.output_dir)


def check_output_dir(output_dir: str) -> None:
    """A training run's folder is not an evaluation's: its metrics.json (the training curves) would be overwritten."""
    if os.path.isdir(output_dir) and any(
        name == "training_args.json" or re.fullmatch(r"checkpoint-\d+", name) for name in os.listdir(output_dir)
    ):
        raise ValueError(
            f"--output_dir {output_dir}: that folder holds a training run, whose metrics.json this evaluation would "
            f"overwrite; choose another folder (for example a subfolder: --output_dir {output_dir}/eval)."
        )


def load_eval_prompts(args: argparse.Namespace):
    """The prompt set (a `datasets.Dataset`), checked for a `prompt` column of strings; imports no torch."""
    from .arguments import ScriptArguments, load_prompts

    dataset = load_prompts(
        ScriptArguments(
            dataset_name=args.dataset_name, dataset_config=args.dataset_config, dataset_train_split=args.dataset_split
        )
    )
    check_prompt_set(dataset, f"--dataset_name {args.dataset_name}")
    if args.max_prompts is not None:
        dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
    return dataset


def check_prompt_set(dataset, name: str) -> None:
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} has no 'prompt' column; its columns are {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError(f"{name} holds no prompts.")
    for i, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"Row {i} of {name} has the prompt {prompt!r}; prompts must be non-empty strings.")


# -- the Python function -----------------------------------------------------------------------------------------------
def _load_trained_weights(trainer, folder: str):
    """Load the trainer's output `folder` (LoRA or full denoiser) into the pipeline; returns a function undoing it."""
    import torch

    adapter = trainer.adapter
    denoiser = trainer.denoiser
    if os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
        if getattr(denoiser, "peft_config", None):
            raise ValueError(
                f"The pipeline's {adapter.denoiser_name} already has LoRA adapters {sorted(denoiser.peft_config)}; "
                "pass a pipeline without LoRA to compare it with --adapter."
            )
        adapter.load_lora(folder)
        denoiser.to(trainer.accelerator.device)

        def undo():
            adapter.unload_lora()

        return undo
    saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in denoiser.state_dict().items()}
    adapter.load_trained_weights(denoiser, folder, is_lora=False)

    def undo():
        with torch.no_grad():
            denoiser.load_state_dict(saved)

    return undo


def evaluate_pipeline(
    model,
    dataset,
    reward_funcs,
    args=None,
    adapter: str | None = None,
    tuned_model=None,
    num_images_per_prompt: int = 1,
    output_dir: str | None = None,
    grid_rows: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, float | None]]:
    """Sample `dataset`'s prompts deterministically (eta = 0, noise fixed by `args.seed`) and score them.

    Args:
        model: a diffusers pipeline, or its Hub id / local path, or a function loading it.
        dataset: a `datasets.Dataset` (or list of dicts) with a `prompt` column; a `category` column gives
            per-category means; other columns reach the rewards as keyword arguments (as in training).
        reward_funcs: reward registry names, dotted import paths or callables (as `DanceGRPOTrainer` takes them).
        args ([`DanceGRPOConfig`], *optional*): sampling settings (`num_inference_steps`, `height`, `width`,
            `guidance_scale`, `shift`, `num_frames`, `per_device_eval_batch_size`, `seed`, `bf16`, `reward_kwargs`...).
            The KL coefficient is ignored (no reference model is built).
        adapter (`str`, *optional*): a folder saved by the trainer (LoRA or full denoiser), evaluated after the base
            model as `"adapter"`; the pipeline is restored afterwards.
        tuned_model (*optional*): a second pipeline (or its Hub id / local path, or a function loading it), evaluated
            last as `"tuned"`, after the first model's trainer is released.
        num_images_per_prompt (`int`, *optional*, defaults to 1): samples per prompt, from different noise.
        output_dir (`str`, *optional*): where `metrics.json`, `samples.csv` and `grid.png` go (main process only);
            None writes nothing.
        grid_rows (`int`, *optional*, defaults to 16): samples in the grid.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `{"base": {...}}` (and `"adapter"`), each mapping every reward name to its mean (see `summarize`). Under
        `accelerate launch` every process returns the same.
    """
    import dataclasses

    from .config import DanceGRPOConfig
    from .trainer import DanceGRPOTrainer

    check_adapter(adapter, "adapter")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be positive, got {num_images_per_prompt}.")
    rows = [dict(row) for row in dataset]
    if not rows or any(not isinstance(row.get("prompt"), str) for row in rows):
        raise ValueError("dataset must hold at least one row, each with a string 'prompt'.")
    if args is None:
        args = DanceGRPOConfig(output_dir=output_dir or "dancegrpo-eval", report_to="none", beta=0.0)
    elif args.beta != 0:
        args = dataclasses.replace(args, beta=0.0)  # evaluation needs no reference model
    # a Dataset goes through the trainer's checks: its prompts (before the pipeline loads), and the conditioning images
    # that image-to-video and editing models need
    checked = dataset if hasattr(dataset, "column_names") else None
    if callable(model) and not hasattr(model, "components"):
        model = model()
    trainer = DanceGRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, eval_dataset=checked)
    categories = None
    if "category" in rows[0]:
        categories = [row["category"] for row in rows for _ in range(num_images_per_prompt)]
    thumbnail_size = 256 if output_dir is not None else None
    labels = [BASE_LABEL] + ([ADAPTER_LABEL] if adapter is not None else [])
    results = {}
    for label in labels:
        undo = _load_trained_weights(trainer, adapter) if label == ADAPTER_LABEL else None
        try:
            results[label] = sample_and_score(
                trainer,
                rows,
                num_images_per_prompt,
                thumbnail_size=thumbnail_size,
                progress=progress,
                description=label,
            )
        finally:
            if undo is not None:
                undo()
    if tuned_model is not None:
        import gc

        del trainer, model  # the first model goes (unless the caller holds it) before the second one loads
        gc.collect()
        if callable(tuned_model) and not hasattr(tuned_model, "components"):
            tuned_model = tuned_model()
        trainer = DanceGRPOTrainer(model=tuned_model, reward_funcs=reward_funcs, args=args)
        results[TUNED_LABEL] = sample_and_score(
            trainer, rows, num_images_per_prompt, thumbnail_size=thumbnail_size, progress=progress, description="tuned"
        )
    metrics = {label: summarize(r.rewards, trainer.reward_func_names, categories) for label, r in results.items()}
    if output_dir is not None and trainer.accelerator.is_main_process:
        write_results(output_dir, metrics, results, rows, num_images_per_prompt, trainer.reward_func_names, grid_rows)
    trainer.accelerator.wait_for_everyone()
    return metrics


def write_results(output_dir, metrics, results, rows, num_images_per_prompt, reward_names, grid_rows) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
        handle.write("\n")
    has_category = "category" in rows[0]
    with open(os.path.join(output_dir, "samples.csv"), "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        header = ["prompt_index", "image_index", "prompt", *(["category"] if has_category else [])]
        writer.writerow(header + [f"{label}/{name}" for label in results for name in reward_names])
        for i, row in enumerate(rows):
            for j in range(num_images_per_prompt):
                sample = i * num_images_per_prompt + j
                values = [
                    "" if math.isnan(value) else repr(value)
                    for r in results.values()
                    for value in r.rewards[sample].tolist()
                ]
                writer.writerow([i, j, row["prompt"], *([row["category"]] if has_category else []), *values])
    save_grid({label: r.thumbnails[:grid_rows] for label, r in results.items()}, os.path.join(output_dir, "grid.png"))


GRID_PAD, GRID_HEADER = 4, 16


def save_grid(thumbnails: dict, path: str) -> None:
    """One column per model (its label above), one row per sample; `GRID_PAD` pixels between and around images."""
    from PIL import Image, ImageDraw

    columns = list(thumbnails.values())
    rows, _, height, width = columns[0].shape
    grid = Image.new(
        "RGB",
        (len(columns) * (width + GRID_PAD) + GRID_PAD, GRID_HEADER + rows * (height + GRID_PAD) + GRID_PAD),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(thumbnails.items()):
        x = GRID_PAD + c * (width + GRID_PAD)
        draw.text((x, 2), label, fill="black")
        for r, image in enumerate(images):
            grid.paste(
                Image.fromarray(image.permute(1, 2, 0).numpy()), (x, GRID_HEADER + GRID_PAD + r * (height + GRID_PAD))
            )
    grid.save(path)


# -- the command line --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """`trl-dancegrpo evaluate ...`; returns the exit status (2: bad input, before any model loads)."""
    parser = make_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check_args(args)
        dataset = load_eval_prompts(args)  # a Hub dataset is fetched before the model: its problems show first
    except (ValueError, OSError) as error:
        sys.stderr.write(f"trl-dancegrpo evaluate: error: {str(error).splitlines()[0]}\n")
        return 2
    from .arguments import ModelArguments, load_model
    from .config import DanceGRPOConfig
    from .rewards.scoring import resolve_reward_funcs

    try:
        given = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
        config = DanceGRPOConfig(
            output_dir=args.output_dir,
            report_to="none",
            seed=args.seed,
            bf16=args.bf16,
            fp16=args.fp16,
            beta=0.0,
            reward_kwargs=args.reward_kwargs,
            offload_text_encoders=args.offload_text_encoders,
            offload_reward_models=args.offload_reward_models,
            **given,
        )
        resolve_reward_funcs(args.reward_funcs, config.reward_kwargs)  # reward weights found before the model loads
        # loaded by evaluate_pipeline when their turn comes: the first is released before the second loads
        base = functools.partial(
            load_model, ModelArguments(model_name_or_path=args.model_name_or_path, dtype=args.dtype)
        )
        tuned = None
        if args.tuned_model_name_or_path is not None:
            tuned = functools.partial(
                load_model, ModelArguments(model_name_or_path=args.tuned_model_name_or_path, dtype=args.dtype)
            )
        metrics = evaluate_pipeline(
            base,
            dataset,
            args.reward_funcs,
            args=config,
            adapter=args.adapter,
            tuned_model=tuned,
            num_images_per_prompt=args.num_images_per_prompt,
            output_dir=args.output_dir,
            grid_rows=args.grid_rows,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:  # ImportError: a missing extra ([ocr])
        sys.stderr.write(f"trl-dancegrpo evaluate: error: {str(error).splitlines()[0]}\n")
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(metrics, indent=2))
        print(f"Wrote metrics.json, samples.csv and grid.png to {os.path.abspath(args.output_dir)}")
    return 0
