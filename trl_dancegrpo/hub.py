"""Sharing on the Hub: the model card (samples before vs. after training, rewards, settings) and checkpoint pushes.

`DanceGRPOTrainer.push_to_hub()` is transformers' `Trainer.push_to_hub`: it saves the model into `args.output_dir`
(the diffusers-format LoRA, or the denoiser with `save_pretrained`), calls `create_model_card` (here:
`write_model_card`) and uploads the folder. This module holds what the card needs and the checkpoint push.
"""

import contextlib
import importlib.resources
import json
import os
import shutil
import weakref
from enum import Enum
from fnmatch import fnmatch
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from diffusers.configuration_utils import FrozenDict
from transformers import TrainerCallback

from .sharding import plain_class
from .video import image_to_tensor


NUM_CARD_PROMPTS = 4
IMAGES_DIR = "images"
SAMPLE_GRID_NAME = f"{IMAGES_DIR}/samples.png"
REWARD_CURVE_NAME = f"{IMAGES_DIR}/reward_curve.png"
MAX_TILE_SIZE = 384  # pixels; larger samples are shrunk in the grid (the single samples keep their size)

# What `_save` writes (diffusers file names), copied from a checkpoint into `output_dir` before a checkpoint push.
MODEL_FILE_PATTERNS = (
    "pytorch_lora_weights*.safetensors",
    "config.json",
    "diffusion_pytorch_model*",
    "training_args.json",
)

# Pipeline class name parts -> the family tag the Hub uses; the first match wins (most specific first).
FAMILY_TAGS = (
    ("skyreels", "skyreels"),
    ("hunyuanvideo", "hunyuan-video"),
    ("stablediffusion3", "sd3"),
    ("stablediffusionxl", "stable-diffusion-xl"),
    ("stablediffusion", "stable-diffusion"),
    ("flux", "flux"),
    ("wan", "wan"),
)

# Training settings shown in the card, then the algorithm's own (`Algorithm.card_settings`). A whitelist: the card never
# shows `hub_token` or anything not listed.
CARD_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "optim",
    "weight_decay",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_generations",
    "num_inference_steps",
    "shift",
    "timestep_fraction",
    "adv_clip_max",
    "num_iterations",
    "reward_weights",
    "multi_objective_aggregation",
    "bf16",
    "fp16",
    "seed",
)


# -- what the card says about the model -------------------------------------------------------------------------------
def hub_base_model(pipeline) -> str | None:
    """The Hub id the pipeline was loaded from, or `None` for a local path or a pipeline built in memory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def local_base_model(pipeline) -> str | None:
    """The local folder the pipeline was loaded from (shown in the card, never as Hub metadata), or `None`."""
    name = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None), "_name_or_path", None)
    return os.path.abspath(name) if isinstance(name, str) and name and os.path.exists(name) else None


def family_tag(pipeline) -> str | None:
    name = type(pipeline).__name__.lower()
    return next((tag for part, tag in FAMILY_TAGS if part in name), None)


def pipeline_task(adapter) -> str:
    """The Hub `pipeline_tag`: `text-to-image`, `image-to-image` (editing), `text-to-video`, `image-to-video` or
    `video-to-video`."""
    return adapter.task


def card_tags(trainer, extra_tags=None) -> list[str]:
    tags = list(trainer._tag_names)
    if trainer.is_lora:
        tags.append("lora")
    tags += [family_tag(trainer.pipeline), pipeline_task(trainer.adapter)]
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    tags += list(extra_tags or [])
    return list(dict.fromkeys(tag for tag in tags if tag))  # unique, in order


def _format_value(value) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def training_settings(trainer) -> list[tuple[str, str]]:
    """(name, value) rows for the card, from the whitelist `CARD_SETTINGS` plus resolved and derived values."""
    args, adapter = trainer.args, trainer.adapter
    rows = [("pipeline", type(trainer.pipeline).__name__)]
    if trainer.is_lora:
        lora = trainer.accelerator.unwrap_model(trainer.model).peft_config["default"]
        targets = sorted(lora.target_modules) if isinstance(lora.target_modules, (set, list)) else lora.target_modules
        rows.append(("fine-tuning", f"LoRA (r={lora.r}, alpha={lora.lora_alpha}, target modules {targets})"))
    else:
        rows.append(("fine-tuning", f"full ({', '.join(adapter.trained_components())})"))
    rows += [
        ("optimizer steps", str(trainer.state.global_step)),
        ("processes", str(args.world_size)),
        ("samples per rollout (all processes)", str(args.generation_batch_size)),
        ("resolution", f"{adapter.height}x{adapter.width}"),
        ("guidance", f"{adapter.guidance_scale:g} ({'embedded' if adapter.embedded_guidance else 'CFG'})"),
    ]
    algorithm = trainer.algorithm
    rows.append(("algorithm", f"{args.algorithm} ({algorithm.card_name})"))
    if algorithm.keeps_trajectory:  # the stochastic sampler's noise; NFT and AWM sample with the ODE (eta 0)
        rows.append(("eta", _format_value(trainer.sampler.eta)))  # resolved: `args.eta=None` is the family's default
    names = list(dict.fromkeys((*CARD_SETTINGS, *algorithm.card_settings)))
    rows += [(name, _format_value(getattr(args, name))) for name in names if hasattr(args, name)]
    return rows


def reward_summary(trainer, before_scores=None, after_scores=None) -> list[dict]:
    """One row per reward: weight, first and last logged training mean, eval mean, fixed-prompt scores."""
    history = trainer.state.log_history
    rows = []
    for k, name in enumerate(trainer.reward_func_names):
        key = f"rewards/{name}/mean"
        logged = [(log["step"], log[key]) for log in history if key in log and "step" in log]
        evaluated = [log[f"eval_{key}"] for log in history if f"eval_{key}" in log]
        rows.append(
            {
                "name": name,
                "weight": f"{float(trainer.reward_weights[k]):g}",
                "first": f"{logged[0][1]:.4g} (step {logged[0][0]})" if logged else "",
                "final": f"{logged[-1][1]:.4g} (step {logged[-1][0]})" if logged else "",
                "eval": f"{evaluated[-1]:.4g}" if evaluated else "",
                "before": _score_text(before_scores, k),
                "after": _score_text(after_scores, k),
            }
        )
    return rows


def _score_text(scores, k) -> str:
    if scores is None:
        return ""
    column = scores[:, k]
    column = column[~torch.isnan(column)]
    return f"{column.mean().item():.4g}" if len(column) else ""


def _versions() -> dict[str, str]:
    found = {}
    for package in ("trl-dancegrpo", "diffusers", "transformers", "peft", "trl", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


# -- images -----------------------------------------------------------------------------------------------------------
def first_frames(images: torch.Tensor) -> torch.Tensor:
    """`(N, 3, H, W)` images as they are; `(N, F, 3, H, W)` videos: their first frame."""
    return images[:, 0] if images.dim() == 5 else images


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def make_image_grid(rows: list[torch.Tensor], max_tile: int = MAX_TILE_SIZE, gap: int = 4):
    """A PIL image: one row per tensor of `(N, 3, H, W)` images in [0, 1] (videos: their first frame), white gaps."""
    from PIL import Image

    tiles = [[to_pil(image) for image in first_frames(row)] for row in rows]
    width, height = tiles[0][0].size
    scale = min(1.0, max_tile / max(width, height))
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    columns = max(len(row) for row in tiles)
    grid = Image.new("RGB", (columns * width + (columns - 1) * gap, len(tiles) * height + (len(tiles) - 1) * gap))
    grid.paste((255, 255, 255), (0, 0, *grid.size))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile.size != (width, height):
                tile = tile.resize((width, height), Image.LANCZOS)
            grid.paste(tile, (c * (width + gap), r * (height + gap)))
    return grid


# -- samples of fixed prompts -----------------------------------------------------------------------------------------
def card_rows(trainer) -> list[dict]:
    """The first `NUM_CARD_PROMPTS` rows of the eval dataset if there is one, else of the train dataset."""
    dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    if isinstance(dataset, dict):  # several eval datasets: the first one
        dataset = next(iter(dataset.values()))
    if dataset is None:
        return []
    return [dict(dataset[i]) for i in range(min(NUM_CARD_PROMPTS, len(dataset)))]


@contextlib.contextmanager
def _keep_rng_state(device):
    # sampling uses its own generators, but rewards may not: leave the training run's random state untouched
    devices = [device] if getattr(device, "type", None) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def sample_and_score(trainer, rows: list[dict], base: bool = False):
    """Deterministic samples (eta = 0, seed `args.seed`) of `rows` and their rewards `[N, K]` (NaN: none).

    `base=True` samples with the LoRA adapter disabled: the model before training. Image-to-video and editing rows
    bring their conditioning image (`row["image"]`), video-to-video rows their source (`row["video"]`).
    """
    prompts = [row["prompt"] for row in rows]
    adapter = trainer.adapter
    kwargs = {"images": [row[adapter.conditioning_column] for row in rows]} if adapter.requires_image else {}
    denoiser = trainer.denoiser
    with _keep_rng_state(trainer.accelerator.device):
        if base:
            denoiser.disable_adapters()
        try:
            images, _ = trainer.generate(prompts, seed=trainer.args.seed, eta=0.0, **kwargs)
        finally:
            if base:
                denoiser.enable_adapters()
        scores = trainer._score(prompts, images, rows)[0]
    return images.cpu(), scores


class ModelCardCallback(TrainerCallback):
    """Holds the model card's samples, and pushes at the end of `train()` when `args.push_to_hub` is set.

    The "before" samples show the starting model: with LoRA they are drawn at card time with the adapter disabled;
    with full fine-tuning they can only be drawn before the first update, so they are drawn at the start of training
    when the trainer is going to push (`args.push_to_hub`).
    """

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)
        self.before = None  # (prompts, images, scores) under the starting model
        self.prepared = None  # samples drawn by `prepare` on every process, for the next card

    def before_samples(self, rows: list[dict]):
        """`(images, scores)` of `rows` under the starting model, or `None` when they cannot be had any more."""
        trainer, prompts = self._trainer(), [row["prompt"] for row in rows]
        if self.before is None or self.before[0] != prompts:
            if not trainer.is_lora:
                return None  # full fine-tuning: only samples drawn at step 0 show the starting model
            self.before = (prompts, *sample_and_score(trainer, rows, base=True))
        return self.before[1:]

    def prepare(self) -> None:
        """Sample the card's fixed prompts now. Every process calls this (sampling a sharded model needs them all)."""
        trainer = self._trainer()
        rows = card_rows(trainer)
        self.prepared = None
        if rows:
            before = self.before_samples(rows)
            with trainer.eval_weights():  # the EMA's with eval_with_ema
                after = sample_and_score(trainer, rows)
            if trainer.is_world_process_zero():  # the one that writes the card
                self.prepared = {"rows": rows, "before": before, "after": after}

    def take(self) -> dict | None:
        """The prepared samples (drawing them now if none are), used once: a later card samples the model again."""
        if self.prepared is None:
            self.prepare()
        prepared, self.prepared = self.prepared, None
        return prepared

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if args.push_to_hub and not trainer.is_lora and state.global_step == 0 and self.before is None:
            rows = card_rows(trainer)
            if rows:
                self.before = ([row["prompt"] for row in rows], *sample_and_score(trainer, rows))

    def on_train_end(self, args, state, control, **kwargs):
        if args.push_to_hub:
            self._trainer().push_to_hub(commit_message="End of training")


def ema_summary(trainer, output_dir: str) -> dict | None:
    """What the card says of the EMA weights saved in `output_dir/ema` (None when there are none)."""
    from .ema import EMA_FOLDER

    ema = trainer.ema
    if ema is None or not ema.started or not os.path.isdir(os.path.join(output_dir, EMA_FOLDER)):
        return None
    return {
        "decay": ema.decay,
        "start_step": ema.start_step,
        "num_updates": ema.num_updates,
        "in_samples": trainer.args.eval_with_ema,
        "lora_load_arguments": trainer.adapter.lora_load_arguments(EMA_FOLDER),
    }


# -- the card ---------------------------------------------------------------------------------------------------------
def _card_imports(
    task: str, tiny_builder: str | None, denoiser_class: str | None, extra: str = "", loader: str = "DiffusionPipeline"
) -> str:
    """The imports of the card's loading snippet: torch and the pipeline class `loader` (a tiny pipeline: its
    builder), the denoiser class for full fine-tuning, diffusers' helpers for videos and source images, and `extra`
    (what the adapter's `image_call_argument` needs)."""
    names = ([] if tiny_builder else [loader]) + ([denoiser_class] if denoiser_class else [])
    lines = [] if tiny_builder else ["import torch"]
    lines += [f"from diffusers import {', '.join(names)}"] if names else []
    helpers = {
        "text-to-video": "export_to_video",
        "image-to-video": "export_to_video, load_image",
        "video-to-video": "export_to_video, load_video",
    }
    helper = helpers.get(task, "load_image" if task == "image-to-image" else None)
    lines += [f"from diffusers.utils import {helper}"] if helper else []
    lines += [extra] if extra else []
    if tiny_builder:
        lines += ([""] if lines else []) + [f"from trl_dancegrpo.tiny import {tiny_builder}"]
    return "\n".join(lines)


def write_model_card(trainer, model_name=None, dataset_name=None, tags=None, license=None, output_dir=None) -> str:
    """Write `README.md` and `images/` into `output_dir` (default `args.output_dir`); returns the card's path.

    Main process only."""
    from huggingface_hub import ModelCard, ModelCardData

    from .plotting import plot_reward_curve

    args, pipeline = trainer.args, trainer.pipeline
    output_dir = output_dir if output_dir is not None else args.output_dir
    os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    samples = trainer.model_card_callback.take()

    prompts, widget, before_scores, after_scores, grid = [], [], None, None, None
    if samples is not None:
        prompts = [row["prompt"] for row in samples["rows"]]
        after_images, after_scores = samples["after"]
        grid_rows = [after_images]
        if samples["before"] is not None:
            before_images, before_scores = samples["before"]
            grid_rows.insert(0, before_images)
        if trainer.adapter.task == "image-to-image":  # editing: the source images on top
            height, width = after_images.shape[-2:]
            grid_rows.insert(0, torch.stack([image_to_tensor(row["image"], height, width) for row in samples["rows"]]))
        make_image_grid(grid_rows).save(os.path.join(output_dir, SAMPLE_GRID_NAME))
        grid = SAMPLE_GRID_NAME
        for i, (prompt, image) in enumerate(zip(prompts, first_frames(after_images))):
            name = f"{IMAGES_DIR}/sample_{i}.png"
            to_pil(image).save(os.path.join(output_dir, name))
            widget.append({"text": prompt, "output": {"url": name}})

    reward_curve = None
    if any(key.startswith("rewards/") for log in trainer.state.log_history for key in log):
        plot_reward_curve(trainer.state.log_history, os.path.join(output_dir, REWARD_CURVE_NAME))
        reward_curve = REWARD_CURVE_NAME

    base_model = hub_base_model(pipeline)
    tiny = getattr(pipeline, "tiny_builder", None)  # (builder name, seed) of `tiny.build_tiny_pipeline`
    hub_model_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    model_name = model_name or (hub_model_id or Path(output_dir).name).split("/")[-1]
    task = pipeline_task(trainer.adapter)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag=task,
        tags=card_tags(trainer, tags),
        license=license,
        datasets=[dataset_name] if dataset_name else None,
        widget=widget or None,
    )
    adapter = trainer.adapter
    denoiser_class = plain_class(
        getattr(pipeline, adapter.trained_components()[0])
        if adapter.has_experts  # the trained model holds the experts: the class of each is the pipeline's
        else trainer.accelerator.unwrap_model(trainer.model)
    ).__name__
    rewards = reward_summary(trainer, before_scores, after_scores)
    ema = ema_summary(trainer, output_dir)
    # trained as another class than the checkpoint's (`pipeline_class`): `DiffusionPipeline` would load the checkpoint's
    loader = type(pipeline).__name__ if getattr(pipeline, "reclassed_from", None) else "DiffusionPipeline"
    template = importlib.resources.files("trl_dancegrpo").joinpath("templates/model_card.md")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        base_model=base_model,
        base_model_path=None if base_model else local_base_model(pipeline),
        # a tiny pipeline built in memory (the demo): the card rebuilds it and loads the weights from this folder
        tiny_builder=tiny[0] if tiny else None,
        tiny_seed=tiny[1] if tiny and tiny[1] else "",
        card_imports=_card_imports(
            task,
            tiny[0] if tiny else None,
            None if trainer.is_lora else denoiser_class,
            adapter.image_call_import if task == "image-to-video" else "",
            loader,
        ),
        loader=loader,
        hub_model_id=hub_model_id or (os.path.abspath(output_dir) if tiny else f"<your-username>/{model_name}"),
        dataset_name=dataset_name,
        is_lora=trainer.is_lora,
        is_video=task.endswith("-to-video"),
        is_edit=task == "image-to-image",
        needs_image=task == "image-to-video",
        image_call_argument=adapter.image_call_argument,
        needs_video=task == "video-to-video",
        pipeline_class=type(pipeline).__name__,
        denoiser_name=adapter.denoiser_name,
        denoiser_class=denoiser_class,
        trained_components=adapter.trained_components(),
        component_subfolders=adapter.has_experts,  # saved in the pipeline's layout, one folder per expert
        # with `ema/` beside them the main weights are named: the Hub would otherwise pick `ema/...` first
        lora_load_arguments=adapter.lora_load_arguments(named=ema is not None),
        lora_load_method=adapter.lora_load_method,
        pipeline_setup=adapter.pipeline_setup(),
        ema=ema,
        prompts=prompts,
        example_prompt=json.dumps(prompts[0] if prompts else "a photo of a cat", ensure_ascii=False),
        sample_grid=grid,
        has_before=samples is not None and samples["before"] is not None,
        reward_curve=reward_curve,
        rewards=rewards,
        has_eval=any(reward["eval"] for reward in rewards),
        settings=training_settings(trainer),
        num_inference_steps=args.num_inference_steps,
        # the pipeline call's arguments after the prompt: guidance, then size (both may be empty)
        call_arguments="".join(
            f", {name}={value:g}" if isinstance(value, float) else f", {name}={json.dumps(value)}"
            for name, value in {**adapter.pipeline_guidance_arguments(), **adapter.pipeline_size_arguments()}.items()
        ),
        height=adapter.height,
        width=adapter.width,
        num_frames=getattr(adapter, "num_frames", None),
        seed=args.seed,
        versions=_versions(),
        algorithm_name=trainer.algorithm.card_name,
        algorithm_paper=trainer.algorithm.card_paper,
        procedure=trainer.algorithm.card_description(
            "videos" if task.endswith("-to-video") else "images", adapter.denoiser_name
        ),
        citation="\n\n".join(trainer.algorithm.citations),
    )
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


# -- pushes during training -------------------------------------------------------------------------------------------
def push_from_checkpoint(trainer, checkpoint_folder: str) -> None:
    """transformers' `Trainer._push_from_checkpoint` with diffusers file names and without `training_args.bin`.

    transformers copies `model.safetensors`-style files (not ours) from the checkpoint and re-pickles `args` (with
    `hub_token`) into the folder it uploads; here the files `_save` wrote are copied, the card is refreshed and the
    folder (and, with `hub_strategy="checkpoint"`/`"all_checkpoints"`, the checkpoint) is uploaded in the background.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, SaveStrategy
    from transformers.utils import PushInProgress
    from transformers.utils.hub import hf_api

    from .ema import EMA_FOLDER

    args = trainer.args
    if args.hub_strategy == HubStrategy.END:
        return
    trainer.model_card_callback.prepare()  # on every process, before the main process decides to push
    if not trainer.is_world_process_zero():
        return
    # as transformers: no new push while the previous one is still uploading, unless hub_always_push
    if not args.hub_always_push and trainer.push_in_progress is not None and not trainer.push_in_progress.is_done():
        trainer.model_card_callback.prepared = None
        return
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    for name in sorted(os.listdir(checkpoint_folder)):
        source = os.path.join(checkpoint_folder, name)
        if os.path.isfile(source) and any(fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS):
            shutil.copy(source, os.path.join(output_dir, name))
        elif name == EMA_FOLDER and os.path.isdir(source):  # the EMA weights, saved as the main ones
            shutil.copytree(source, os.path.join(output_dir, name), dirs_exist_ok=True)
    model_name = (args.hub_model_id or Path(output_dir).name).split("/")[-1]
    trainer.create_model_card(model_name=model_name)

    if args.save_strategy == SaveStrategy.STEPS:
        commit_message = f"Training in progress, step {trainer.state.global_step}"
    else:
        commit_message = f"Training in progress, epoch {int(trainer.state.epoch)}"
    jobs = [
        hf_api().upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=output_dir,
            commit_message=commit_message,
            token=args.hub_token,
            run_as_future=True,
            ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"],
            revision=args.hub_revision,
        )
    ]
    if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        path_in_repo = (
            "last-checkpoint" if args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
        )
        jobs.append(
            hf_api().upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=checkpoint_folder,
                path_in_repo=path_in_repo,
                commit_message=commit_message + ", checkpoint",
                token=args.hub_token,
                run_as_future=True,
                revision=args.hub_revision,
            )
        )
    if trainer.push_in_progress is None or trainer.push_in_progress.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        trainer.push_in_progress.jobs.extend(jobs)


class TrackerConfig(FrozenDict):
    """A diffusers model config that transformers' reporting callbacks can serialise.

    TensorBoard's, MLflow's and Trackio's callbacks call `model.config.to_json_string()` / `to_dict()`, which
    transformers configs have and diffusers' `FrozenDict` lacks (an AttributeError at the first step otherwise).
    """

    def to_dict(self) -> dict:
        return dict(self)

    def to_json_string(self) -> str:
        return json.dumps(dict(self), indent=2, sort_keys=True, default=str)
