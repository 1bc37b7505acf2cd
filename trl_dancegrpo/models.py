"""Building the model to train: the pipeline, its adapter, the prepared denoiser, the frozen modules' dtype and device.

Public functions called by both the trainer (`DanceGRPOTrainer.__init__`) and `estimate-memory` (`memory/estimate.py`),
so the estimate measures exactly the model the trainer builds. Names used across the package: the *pipeline* is the
diffusers pipeline; the *denoiser* is its bare trained module (transformer or UNet, `adapter.denoiser`); the trainer's
`self.model` is that denoiser as `Trainer` wraps it (DDP, FSDP), and `trainer.denoiser` unwraps it again.
"""

import contextlib
from collections.abc import Callable

import torch

from .adapters import PipelineAdapter, get_adapter_class


ENCODER_COMPONENTS = ("text_encoder", "image_encoder")  # pipeline components `offload_text_encoders` keeps on the CPU


def training_dtype(args) -> torch.dtype:
    """The dtype of the frozen weights (and of a LoRA's base weights): bfloat16 / float16 with `bf16` / `fp16`."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype=dtype)`, without diffusers' warning about float32 modules when the model has none to keep."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
    else:
        torch.nn.Module.to(module, dtype=dtype)


def resolve_pipeline(model, pipeline_class: str | None = None):
    """The pipeline `model` names: itself if it is a pipeline, else loaded from a Hub id or local path; with
    `pipeline_class`, its modules in that (supported) pipeline class (a text-to-video checkpoint as video-to-video)."""
    from .adapters import supported_pipelines

    if pipeline_class is not None and pipeline_class not in supported_pipelines():
        raise ValueError(
            f"pipeline_class={pipeline_class!r} is not a supported pipeline; choose one of "
            f"{', '.join(supported_pipelines())}, or leave it unset to keep the checkpoint's."
        )
    if isinstance(model, str):
        from .loading import load_pipeline

        model = load_pipeline(model)
    if not hasattr(model, "components"):
        raise TypeError(
            f"model must be a diffusers pipeline or a Hub id / local path, got {type(model).__name__}. "
            "To train a bare denoiser, pass the pipeline that holds it."
        )
    if pipeline_class is not None and type(model).__name__ != pipeline_class:
        import inspect

        import diffusers

        target = getattr(diffusers, pipeline_class)
        accepted = inspect.signature(target.__init__).parameters
        left_out = [name for name, module in model.components.items() if name not in accepted and module is not None]
        if left_out:
            raise ValueError(
                f"pipeline_class={pipeline_class!r} has no place for this {type(model).__name__}'s "
                f"{', '.join(left_out)}: use a checkpoint of the task {pipeline_class} serves."
            )
        # the same modules in the other task's class, which keeps the source's name (the model card loads it by that)
        source = model
        model = target(**{name: module for name, module in model.components.items() if name in accepted})
        model.register_to_config(_name_or_path=getattr(source, "name_or_path", None))
        model.reclassed_from = type(source).__name__
        if hasattr(source, "tiny_builder"):  # built in memory (tiny.py): the card rebuilds it with its builder
            model.tiny_builder = source.tiny_builder
    return model


def make_adapter(pipeline, args) -> PipelineAdapter:
    """The adapter of `pipeline` (picked by its class) set up from the training config `args` (a `DanceGRPOConfig`).

    Raises `ValueError` for settings the model cannot take (frames of an image model, experts of a one-denoiser
    model, CFG with more than one update per rollout).
    """
    adapter_class = get_adapter_class(pipeline)
    kwargs = {}
    if adapter_class.is_video:
        kwargs["num_frames"] = args.num_frames
    elif args.num_frames not in (None, 1):
        raise ValueError(
            f"num_frames={args.num_frames} but {type(pipeline).__name__} generates images; leave num_frames unset."
        )
    if adapter_class.takes_strength:
        kwargs["strength"] = args.strength
    elif args.strength is not None:
        raise ValueError(
            f"strength is for video-to-video pipelines; {type(pipeline).__name__} samples from noise: leave it unset."
        )
    if args.train_experts is not None:
        if not adapter_class.has_experts:
            raise ValueError(
                f"train_experts is for two-expert models (Wan 2.2 A14B); {type(pipeline).__name__} has one "
                "denoiser: leave train_experts unset."
            )
        kwargs["train_experts"] = args.train_experts
    adapter = adapter_class(
        pipeline,
        args.num_inference_steps,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        shift=args.shift,
        **kwargs,
    )
    adapter.set_sde_type(args.sde_type)
    from .algorithms import algorithm_class

    algorithm_class(args.algorithm).check_adapter(adapter)  # the objective's refusals of a model family
    # The paper updates once per prompt batch when CFG is on: one rollout feeds exactly one optimizer step.
    once_per_batch = args.num_iterations == 1 and args.steps_per_generation == args.gradient_accumulation_steps
    if adapter.use_cfg and not once_per_batch:
        raise ValueError(
            f"{type(pipeline).__name__} trains with classifier-free guidance (guidance_scale "
            f"{adapter.guidance_scale}), and with CFG DanceGRPO updates once per prompt batch: set num_iterations=1 "
            "and leave steps_per_generation unset (= gradient_accumulation_steps), or train without CFG "
            "(guidance_scale=1)."
        )
    vae = getattr(pipeline, "vae", None)
    if args.vae_tiling:
        vae.enable_tiling()
    if args.vae_slicing:
        vae.enable_slicing()
    return adapter


def prepare_denoiser(adapter: PipelineAdapter, denoiser, peft_config, args):
    """Make `denoiser` (the bare `torch.nn.Module` that predicts the noise/velocity) ready to train; returns it.

    Frozen components are frozen and in eval mode; with a `peft_config` the base weights are cast to the training
    dtype and frozen, the LoRA added (default targets: the adapter's) with its weights in float32; without one, the
    whole denoiser trains. Parameters that never reach the output stay frozen, dropout is off, and gradient
    checkpointing is enabled here (and `args.gradient_checkpointing` turned off, so that `Trainer` does not apply it).
    """
    for module in adapter.frozen_modules().values():
        module.requires_grad_(False).eval()
    if peft_config is not None:
        denoiser.requires_grad_(False)
        cast_module(denoiser, training_dtype(args))
        if peft_config.target_modules is None:
            peft_config.target_modules = list(adapter.default_lora_target_modules)
        if getattr(denoiser, "peft_config", None):
            raise ValueError(
                f"The {adapter.denoiser_name} already has LoRA adapters {sorted(denoiser.peft_config)} (from "
                "load_lora_weights or an earlier trainer). Pass a freshly loaded pipeline with peft_config, or fuse "
                "the loaded LoRA first (pipeline.fuse_lora(); pipeline.unload_lora_weights())."
            )
        denoiser.add_adapter(peft_config)
        for param in denoiser.parameters():  # trainable LoRA weights in float32, as diffusers' training scripts
            if param.requires_grad:
                param.data = param.data.float()
    else:
        denoiser.requires_grad_(True)
    # parameters that never reach the output (SD3's last context queries) stay frozen: DDP needs every trained
    # parameter to get a gradient
    unused = tuple(f"{prefix}." for prefix in adapter.unused_parameter_prefixes())
    for name, param in denoiser.named_parameters():
        if name.startswith(unused):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in denoiser.parameters()):
        raise ValueError("No trainable parameter: check peft_config.target_modules against the denoiser's modules.")
    # Dropout would make the re-scored log-prob differ from the rollout's (ratio != 1): run without it.
    denoiser.eval()
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        args.gradient_checkpointing = False  # done: transformers' Trainer would call an API diffusers lacks
        if hasattr(args, "activation_checkpointing"):
            args.activation_checkpointing = False
    return denoiser


def place_frozen_modules(adapter: PipelineAdapter, device, dtype: torch.dtype, offload_text_encoders: bool) -> None:
    """Move the frozen components to `device` (the text/image encoders to the CPU with `offload_text_encoders`) and
    cast them to `dtype` (left as loaded when it is float32)."""
    for name, module in adapter.frozen_modules().items():
        # offloaded encoders wait on the CPU and visit the GPU only to encode (see `on_device_while_used`)
        offload = offload_text_encoders and name.startswith(ENCODER_COMPONENTS)
        module.to("cpu" if offload else device)
        if dtype != torch.float32:
            cast_module(module, dtype)


@contextlib.contextmanager
def on_device_while_used(moves: list[Callable], device, lock: contextlib.AbstractContextManager | None = None):
    """Offloading: each `move(device)` on entry and `move("cpu")` on exit (`module.to` of the offloaded encoders,
    `move_to` of the offloaded reward models). Nothing to move: nothing done, no lock taken."""
    if not moves:
        yield
        return
    with lock if lock is not None else contextlib.nullcontext():
        for move in moves:
            move(device)
        try:
            yield
        finally:
            for move in moves:
                move("cpu")
