"""Peak GPU memory and FLOPs of a DanceGRPO recipe, from one fake-tensor run of our own code at the real size.

What runs (on fake CPU tensors, see `fake.py`): the adapter's prompt (and image) encoding, one rollout slice of the
denoiser through `rollout.denoise` with the SDE step, the VAE decode of that slice, one training slice (forward, the
step's log-prob, the PPO-clip loss, backward into existing gradients), and one optimizer step with the optimizer the
Trainer builds. Every other slice and step of an iteration repeats one of these, so their peaks are the process's.
Static parts (weights, gradients, optimizer states, the trajectory buffer, reward models) are counted from the
tensors themselves. DiffusionNFT and AWM (`algorithm`) keep no trajectory: their buffer is the clean latents and the
training noises (and, for a reused rollout, the old velocities); they need no reference or old-policy copy of the model
(the old velocity is the detached current one on-policy). Their training slice is measured as GRPO's (the same
denoiser forward and backward; the losses differ by a few latent-sized tensors).
"""

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..algorithms.base import keeps_old_velocity
from ..config_checks import FORWARD_PROCESS_ALGORITHMS
from .configs import MODEL_CONFIGS_DIR, build_meta_pipeline, load_pipeline_config


ENCODER_PREFIXES = ("text_encoder", "image_encoder")
WEIGHT_FREE_REWARDS = ("brightness", "jpeg_compressibility", "jpeg_incompressibility", "audio_loudness")
# pipelines whose prompt embeddings keep each prompt's own tokens: estimated with prompts of the maximum length
OWN_TOKEN_PIPELINES = (
    "QwenImagePipeline",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "QwenImage21Pipeline",
    "ZImagePipeline",
)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied or repeated ones count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()])


@dataclass
class MemoryEstimate:
    """Per-process figures in bytes. `parts` are the measured and counted pieces (unsharded); `options` how they combine
    (FSDP processes, offloading), so that `with_options` re-derives the figures of other settings without a re-run."""

    model: str
    settings: dict
    parts: dict[str, int]
    options: dict
    flops_per_iteration: float = 0.0
    flops_parts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def with_options(self, **changes) -> "MemoryEstimate":
        return dataclasses.replace(self, options={**self.options, **changes})

    @property
    def breakdown(self) -> dict[str, int]:
        """What one process holds, by kind (the first seven keys are the JSON `breakdown_gib`)."""
        p, o = self.parts, self.options
        shards = o["num_processes"]
        # FSDP shards the denoiser's parameters, gradients and optimizer states; each forward gathers one block at a
        # time (counted as two of the largest blocks, the one in use and the next one prefetched, in the compute
        # dtype). Its mixed-precision policy gathers them already cast, so autocast's cache of float32 weights cast
        # for the forward (held until the forward ends) does not exist there.
        gathered = 2 * p["largest_block_compute"] if shards > 1 else 0
        activations = p["activations"] - (p["autocast_weight_casts"] if shards > 1 else 0)
        rollout_forward = p["rollout_forward"] - (p["rollout_autocast_weight_casts"] if shards > 1 else 0)
        # Context parallelism over `n` processes: each holds 1/n of every sequence-sized activation (the tokens it
        # owns; Ulysses' attention holds all tokens of 1/n of the heads, the same size), plus the communication
        # buffers: the all-to-all send and receive copies of one attention's q, k, v (one layer at a time) and the
        # gathered whole prediction (and, in training, its gradient). Weights, the trajectory buffer and the decode
        # are per process as without it (a group's processes all hold their samples).
        n = o.get("context_parallel", 1)
        if n > 1:
            activations = activations // n + 2 * p["attention_qkv_train"] // n + 2 * p["prediction_train"]
            rollout_forward = rollout_forward // n + 2 * p["attention_qkv_rollout"] // n + p["prediction_rollout"]
        return {
            "denoiser_weights": p["frozen_denoiser"] // shards + gathered,
            "trainable_weights": p["trainable"] // shards,
            "gradients": p["trainable"] // shards,
            "optimizer_states": p["optimizer_states"] // shards,
            # the EMA (`ema_decay`): a float32 copy of the trained weights, sharded as they are; none with ema_on_cpu
            "ema_weights": p["trainable_float32"] // shards if o.get("ema") and not o.get("ema_on_cpu") else 0,
            "activations": activations,
            "frozen_modules": (0 if o["offload_text_encoders"] else p["encoders"]) + p["other_frozen"],
            "reward_models": 0 if o["offload_reward_models"] else p["rewards"],
            "rollout_forward": rollout_forward,
            "vae_decode": p["vae_decode"],
            "trajectory_buffer": p["trajectory_buffer"],
        }

    @property
    def phases(self) -> dict[str, int]:
        """What is alive at the peak of each phase of an iteration."""
        p, o, b = self.parts, self.options, self.breakdown
        resident = sum(b[k] for k in ("denoiser_weights", "trainable_weights", "optimizer_states", "ema_weights"))
        resident += b["frozen_modules"] + b["reward_models"]
        buffers = p["trajectory_buffer"] + p["conditioning"]
        return {
            "prompt encoding": resident + (p["encoders"] if o["offload_text_encoders"] else 0) + p["encoding"],
            "rollout (denoiser forward)": resident + buffers + b["rollout_forward"],
            "rollout (VAE decode)": resident + buffers + p["images"] + p["vae_decode"],
            "reward scoring": resident + buffers + p["images"] + (p["rewards"] if o["offload_reward_models"] else 0),
            "training step (backward)": resident + buffers + b["gradients"] + b["activations"],
            "optimizer step": resident + b["gradients"] + p["optimizer_temporaries"] // o["num_processes"],
        }

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=phases.get)

    @property
    def training_step_peak(self) -> int:
        keys = ("denoiser_weights", "trainable_weights", "gradients", "optimizer_states", "activations")
        return sum(self.breakdown[key] for key in keys)


def reward_model_bytes(reward_funcs: list[str], dtype: torch.dtype) -> tuple[int, list[str]]:
    """Bytes of the reward models named in the recipe (the built-in table), and notes on those not counted."""
    import json

    with open(os.path.join(MODEL_CONFIGS_DIR, "rewards.json"), encoding="utf-8") as handle:
        table = json.load(handle)
    size = torch.tensor([], dtype=dtype).element_size()
    counted, notes = {}, []
    for name in reward_funcs:
        if name in table["rewards"]:
            counted[table["shared_weights"].get(name, name)] = table["rewards"][name] * size
        elif name not in WEIGHT_FREE_REWARDS:
            notes.append(f"reward {name!r} is not in the size table (model_configs/rewards.json): not counted")
    return sum(counted.values()), notes


def _placeholder_images(adapter, count: int):
    """Conditioning placeholders of the training size: an image per row, or for video-to-video a clip of
    `num_frames` frames."""
    from PIL import Image

    if adapter.conditioning_column == "video":
        return [[Image.new("RGB", (adapter.width, adapter.height))] * adapter.num_frames for _ in range(count)]
    return [Image.new("RGB", (adapter.width, adapter.height)) for _ in range(count)]


def _training_loss(step, old_log_prob, advantages, args) -> torch.Tensor:
    """The trainer's PPO-clip loss on one slice (`objectives.clipped_policy_loss`, or GRPO-Guard's on the stored
    transition means, `algorithms.grpo_guard.guard_policy_loss`), summed as the trainer does."""
    from ..algorithms.grpo_guard import ALGORITHM, guard_policy_loss
    from ..objectives import clipped_policy_loss

    if args.algorithm == ALGORITHM:
        old_mean, dt = torch.empty_like(step.prev_sample_mean), -torch.ones_like(advantages)
        loss = guard_policy_loss(
            step.prev_sample_mean, old_mean, step.prev_sample, step.std_dev, dt, advantages, args.epsilon
        )[0]
        return loss.sum()
    return clipped_policy_loss(step.log_prob, old_log_prob, advantages, args.epsilon)[0].sum()


class _Run:
    """One fake run: builds the pipeline and the trainer's denoiser, then measures each phase."""

    def __init__(self, script_args, args, model_args, num_processes: int):
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..models import cast_module, make_adapter, prepare_denoiser, training_dtype

        self.args, self.model_args, self.script_args = args, model_args, script_args
        self.num_processes = num_processes
        self.config = load_pipeline_config(model_args.model_name_or_path)
        if getattr(args, "pipeline_class", None):  # the checkpoint's components in another task's pipeline class
            self.config = {
                **self.config,
                "model_index": {**self.config["model_index"], "_class_name": args.pipeline_class},
            }
        pipeline = build_meta_pipeline(self.config)
        if hasattr(pipeline, "_get_t5_prompt_embeds") and type(pipeline).__name__.startswith("Wan"):
            pipeline._get_t5_prompt_embeds = _untrimmed_t5_prompt_embeds(pipeline)
        self.notes = []
        pipeline_name = type(pipeline).__name__
        if pipeline_name == "QwenImagePipeline":
            pipeline._get_qwen_prompt_embeds = _full_length_qwen_prompt_embeds(pipeline)
            self.notes.append(
                "prompt length: every prompt is assumed to fill the maximum (the adapter's max_sequence_length "
                "text tokens): Qwen-Image keeps each prompt's own tokens, a count fake tensors do not hold; real "
                "prompts are shorter, so the figures are an upper bound"
            )
        elif pipeline_name in OWN_TOKEN_PIPELINES:
            self.notes.append(
                "prompt length: every prompt is assumed to fill the maximum (the adapter's max_sequence_length "
                f"text tokens): {pipeline_name} keeps each prompt's own tokens; real prompts are shorter, so the "
                "figures are an upper bound"
            )
        self.adapter = make_adapter(pipeline, args)
        if self.adapter.has_experts:
            if num_processes > 1:
                raise ValueError(
                    f"--num_processes {num_processes}: {type(pipeline).__name__} has two experts, which the trainer "
                    "trains under DDP (or on one GPU), not FSDP: estimate with --num_processes 1 (DDP processes each "
                    "hold what one process holds)."
                )
            _measure_one_expert(self.adapter.experts)
        if hasattr(self.adapter, "preprocess_images"):
            self.adapter.preprocess_images = _outside_fake_mode(self.adapter.preprocess_images)
        if self.adapter.value_branch_keys:
            self.adapter.predict = _real_stand_ins(self.adapter)
        self.eta = args.eta if args.eta is not None else self.adapter.eta_for(args.sde_type)
        self.weight_dtype = training_dtype(args)
        from ..arguments import lora_config

        peft_config = lora_config(model_args)
        # the trainer's own preparation (frozen parts, LoRA in float32, gradient checkpointing), on the meta device
        model_dtype = getattr(torch, model_args.dtype)
        for module in self.adapter.frozen_modules().values():
            cast_module(module, model_dtype if self.weight_dtype == torch.float32 else self.weight_dtype)
        cast_module(self.adapter.denoiser, model_dtype)
        self.gradient_checkpointing = args.gradient_checkpointing  # the preparation turns the flag off once applied
        self.denoiser = prepare_denoiser(self.adapter, self.adapter.denoiser, peft_config, args)
        self.is_lora = peft_config is not None
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        from .fake import make_fake

        for module in [self.denoiser, *self.adapter.frozen_modules().values()]:
            make_fake(module, self.fake_mode)

    # -- sizes -------------------------------------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        """Samples one micro-step trains on (best-of-n keeps `best_of_n / G` of them)."""
        args = self.args
        if args.best_of_n:
            return args.per_device_train_batch_size * args.best_of_n // args.num_generations
        return args.per_device_train_batch_size

    @property
    def rollout_samples(self) -> int:
        return self.args.per_device_train_batch_size * self.args.steps_per_generation

    @property
    def slice_size(self) -> int:
        return min(self.args.rollout_batch_size or self.args.per_device_train_batch_size, self.micro_batch)

    @property
    def rollout_slice_size(self) -> int:
        return min(self.args.rollout_batch_size or self.args.per_device_train_batch_size, self.rollout_samples)

    @property
    def num_train_steps(self) -> int:
        """Trained steps per sample, as the trainer's sampler counts them."""
        from ..rollout import TrajectorySampler

        args = self.args
        sampler = TrajectorySampler(
            self.adapter, self.eta, window_size=args.sde_window_size, timestep_fraction=args.timestep_fraction
        )
        return sampler.num_train_steps

    def autocast(self):
        if self.weight_dtype == torch.float32:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.weight_dtype)

    # -- phases ------------------------------------------------------------------------------------------------------
    def encode(self, tracker):
        """Conditioning of the distinct rows of one rollout, as the trainer encodes it (no gradient)."""
        from ..rollout import index_conditioning

        rows = max(1, self.rollout_samples // self.args.num_generations)
        if type(self.adapter.pipeline).__name__ in OWN_TOKEN_PIPELINES:
            prompts = [_long_prompt(self.adapter, i) for i in range(rows)]
        else:  # the other pipelines pad or cut every prompt to their fixed length
            prompts = [f"prompt number {i}" for i in range(rows)]
        images = _placeholder_images(self.adapter, rows) if self.adapter.requires_image else None
        tracker.reset_peak()
        start = tracker.live
        with torch.no_grad():
            cond = self.adapter.encode_conditioning(prompts, images)
            negative = self.adapter.negative_conditioning() if self.adapter.use_cfg else None
        peak = tracker.peak - start
        index = torch.arange(self.rollout_samples) // self.args.num_generations
        return index_conditioning(cond, index.clamp_max(rows - 1)), negative, peak

    def latents(self, count: int) -> torch.Tensor:
        return self.adapter.initial_noise(count, None, "cpu", torch.float32)

    def rollout_slice(self, tracker, cond, negative, flops):
        """One no-gradient denoiser forward of a rollout slice with its SDE step, then its decode."""
        from ..rollout import denoise, index_conditioning

        size = self.rollout_slice_size
        latents = self.latents(size)
        step_index = torch.zeros(size, dtype=torch.long)
        part = index_conditioning(cond, slice(0, size))
        tracker.reset_peak()
        start = tracker.live
        tracker.weight_casts = 0
        with torch.no_grad(), flops.section("rollout_forward"):
            with self.autocast():
                output = denoise(self.adapter, self.denoiser, latents, step_index, part, negative)
            _check_output(output, latents, self.model_args.model_name_or_path)
            # the sampled next latent, made here: the sampling branch of the step tests `std.any()`, a value fake
            # tensors do not have (re-scoring a given sample allocates the same tensors)
            sampled = torch.empty_like(latents)
            step = self.adapter.step(output, latents, step_index, self.eta, prev_sample=sampled)
            del output
        forward_peak = tracker.peak - start
        self.rollout_weight_casts = tracker.weight_casts
        tracker.reset_peak()
        start = tracker.live
        with torch.no_grad(), flops.section("decode"), self.autocast():
            images = self.adapter.decode(step.prev_sample)
        decode_peak = tracker.peak - start
        image_bytes = images.numel() * 4 * self.rollout_samples // size
        return forward_peak, decode_peak, image_bytes

    def training_slice(self, tracker, cond, negative, flops):
        """Forward, log-prob, loss and backward of one training slice, gradients already allocated."""
        from ..rollout import denoise, index_conditioning

        size = self.slice_size
        x_t, x_next = self.latents(size), self.latents(size)
        step_index = torch.zeros(size, dtype=torch.long)
        part = index_conditioning(cond, slice(0, size))
        trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        for param in trainable:
            param.grad = torch.zeros_like(param)
        tracker.reset_peak()
        start = tracker.live
        with flops.section("train_forward_backward"):
            tracker.weight_casts = 0
            with self.autocast():
                output = denoise(self.adapter, self.denoiser, x_t, step_index, part, negative)
            self.weight_casts = tracker.weight_casts  # freed when the autocast region ends, after the forward
            _check_output(output, x_t, self.model_args.model_name_or_path)
            step = self.adapter.step(output, x_t, step_index, self.eta, prev_sample=x_next)
            loss = _training_loss(step, torch.zeros(size), torch.ones(size), self.args)
            if self.args.beta > 0:  # the reference forward of the KL term, made while the graph is alive
                with torch.no_grad(), self.autocast():
                    denoise(self.adapter, self.denoiser, x_t, step_index, part, negative)
            loss.backward()
        return tracker.peak - start, trainable

    def optimizer_step(self, tracker, trainable):
        """The Trainer's optimizer (class and arguments from the config), one step; its states and temporaries."""
        from transformers import Trainer

        optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        tracker.reset_peak()
        start = tracker.live
        try:
            optimizer = optimizer_class(trainable, **kwargs)
            optimizer.step()
        except RuntimeError:  # a fused kernel without a fake-tensor implementation: the per-tensor path
            kwargs = {k: v for k, v in kwargs.items() if k not in ("fused", "foreach")}
            optimizer = optimizer_class(trainable, foreach=False, **kwargs)
            optimizer.step()
        states = tensor_bytes(
            [
                value
                for state in optimizer.state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor)
            ]
        )
        return states, tracker.peak - start - states


def _long_prompt(adapter, number: int) -> str:
    """A placeholder prompt of the adapter's maximum number of text tokens (`max_sequence_length` characters: the
    estimate's byte-level stand-in for Qwen's tokenizers gives one token per character), so that the pipelines that
    keep each prompt's own tokens get the most."""
    length = getattr(adapter, "max_sequence_length", None) or 512
    return (f"{number} " + "a" * length)[:length]


def _outside_fake_mode(function):
    """`function` run on real tensors: image preprocessing checks pixel values, which fake tensors do not hold."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)

    return wrapped


def _real_stand_ins(adapter):
    """`adapter.predict` with real ones (broadcast from one stored value, in the denoiser's dtype so that no cast copies
    them) for the conditioning the denoiser branches on (`value_branch_keys`), which the fake encoders give without
    values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    predict, keys = adapter.predict, adapter.value_branch_keys

    def wrapped(denoiser, latents, step_index, cond):
        with unset_fake_temporarily():  # one stored value, broadcast: see `fake.RealValues`
            real = {key: torch.ones((), dtype=adapter.denoiser.dtype).expand(cond[key].shape) for key in keys}
        return predict(denoiser, latents, step_index, {**cond, **real})

    return wrapped


def _measure_one_expert(experts) -> None:
    """Every forward of the estimate through the first trained expert of a two-expert model (Wan 2.2 A14B).

    `WanExperts` picks each row's expert from a tensor's values, which fake tensors do not hold. The measured slices
    are one step each, which one expert computes; the first trained one is the expert whose activations a training
    slice keeps (both experts of A14B have the same architecture, so either gives the same figures). Weights,
    gradients and optimizer states are still counted over both experts (the module holds both).
    """
    measured = getattr(experts, experts.trained[0])

    def forward(hidden_states, timestep, expert=None, **kwargs):
        return measured(hidden_states=hidden_states, timestep=timestep, **kwargs)[0]

    experts.forward = forward


def _full_length_qwen_prompt_embeds(pipeline):
    """QwenImagePipeline's prompt encoding with every prompt at the maximum length: the pipeline cuts each prompt's
    hidden states to its own token count (from the attention mask's values, which fake tensors do not hold) and pads
    them to the longest; here every prompt fills `tokenizer_max_length` tokens after the template, so `encode_prompt`
    keeps `max_sequence_length` of them, the most a real prompt can have."""

    def get_qwen_prompt_embeds(prompt=None, device=None, dtype=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        drop = pipeline.prompt_template_encode_start_idx
        inputs = pipeline.tokenizer(
            [pipeline.prompt_template_encode.format(text) for text in prompt],
            max_length=pipeline.tokenizer_max_length + drop,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        mask = torch.ones_like(inputs.input_ids)
        output = pipeline.text_encoder(input_ids=inputs.input_ids, attention_mask=mask, output_hidden_states=True)
        embeds = output.hidden_states[-1][:, drop:]
        return embeds.to(dtype=dtype or pipeline.text_encoder.dtype), None  # all tokens real: the pipeline's None

    return get_qwen_prompt_embeds


def _untrimmed_t5_prompt_embeds(pipeline):
    """WanPipeline's prompt encoding without its trim: it cuts each prompt's embeddings to its token count and pads them
    back with zeros to `max_sequence_length`, the same shape, from token counts that fake tensors do not hold."""

    def get_t5_prompt_embeds(prompt=None, num_videos_per_prompt=1, max_sequence_length=226, device=None, dtype=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        inputs = pipeline.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        embeds = pipeline.text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state
        embeds = embeds.to(dtype=dtype or pipeline.text_encoder.dtype).repeat(1, num_videos_per_prompt, 1)
        return embeds.view(len(prompt) * num_videos_per_prompt, max_sequence_length, -1)

    return get_t5_prompt_embeds


def _check_output(output: torch.Tensor, latents: torch.Tensor, model: str) -> None:
    if tuple(output.shape) != tuple(latents.shape):
        raise ValueError(
            f"{model}: the denoiser returned shape {tuple(output.shape)} for latents of shape {tuple(latents.shape)}: "
            "the resolution or frame count does not fit the model (e.g. a latent side the patch size does not divide)."
        )


class _Flops:
    """FLOPs of named sections, read from the tracker's counter."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.parts: dict[str, float] = {}

    def section(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def counting():
            start = self.tracker.flops
            yield
            self.parts[name] = self.parts.get(name, 0.0) + self.tracker.flops - start

        return counting()


def estimate_memory(
    script_args, args, model_args, num_processes: int = 1, context_parallel: int = 1
) -> MemoryEstimate:
    """Run the fake-tensor estimate of one training process of the recipe given by the three parsed argument sets
    (`context_parallel`: processes splitting each sample's sequence, see `MemoryEstimate.breakdown`)."""
    from .fake import LiveMemory, RealValues, cuda_autocast_policy, flash_attention

    started, started_cpu = time.perf_counter(), time.process_time()
    args = copy.deepcopy(args)  # the trainer's preparation edits the config (gradient checkpointing)
    run = _Run(script_args, args, model_args, num_processes)
    adapter, denoiser = run.adapter, run.denoiser
    frozen = adapter.frozen_modules()
    encoders = sum(module_bytes(m) for name, m in frozen.items() if name.startswith(ENCODER_PREFIXES))
    others = sum(module_bytes(m) for name, m in frozen.items() if not name.startswith(ENCODER_PREFIXES))
    trainable = tensor_bytes(p for p in denoiser.parameters() if p.requires_grad)
    trainable_float32 = 4 * sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen_denoiser = module_bytes(denoiser) - trainable
    if args.beta > 0 and not run.is_lora:
        others += module_bytes(denoiser)  # the frozen reference copy (unsharded, see docs)
    rewards, notes = reward_model_bytes(list(script_args.reward_funcs), run.weight_dtype)
    notes = run.notes + notes
    tracker = LiveMemory()
    flops = _Flops(tracker)
    with run.fake_mode, RealValues(), cuda_autocast_policy(), flash_attention(), tracker:
        cond, negative, encode_peak = run.encode(tracker)
        cond_bytes = tensor_bytes([*cond.values(), *(negative or {}).values()])
        forward_peak, decode_peak, image_bytes = run.rollout_slice(tracker, cond, negative, flops)
        activations, trainable_params = run.training_slice(tracker, cond, negative, flops)
        optimizer_states, optimizer_temporaries = run.optimizer_step(tracker, trainable_params)
        latent_bytes = run.latents(1).numel() * 4
    steps = args.num_inference_steps
    # the latents (initial noise + one per step) and float32 log-probs; GRPO-Guard also keeps each step's mean
    stored_latents = steps + 1 + (steps if args.algorithm == "grpo_guard" else 0)
    trajectory = run.rollout_samples * (latent_bytes * stored_latents + 4 * steps)
    if args.algorithm in FORWARD_PROCESS_ALGORITHMS:  # NFT, AWM: no trajectory, no log-probs (algorithms/base.py)
        # the clean final latent and one noise per trained step; a reused rollout keeps the old velocities too
        trajectory = run.rollout_samples * latent_bytes * (1 + run.num_train_steps * (1 + keeps_old_velocity(args)))

    parts = {
        "frozen_denoiser": frozen_denoiser,
        "trainable": trainable,
        "trainable_float32": trainable_float32,
        "largest_block_compute": max((sum(p.numel() for p in b.parameters()) for b in _blocks(denoiser)), default=0)
        * torch.tensor([], dtype=run.weight_dtype).element_size(),
        "optimizer_states": optimizer_states,
        "optimizer_temporaries": max(optimizer_temporaries, 0),
        "activations": activations,
        "autocast_weight_casts": run.weight_casts,
        "rollout_autocast_weight_casts": run.rollout_weight_casts,
        "encoders": encoders,
        "other_frozen": others,
        "rewards": rewards,
        "encoding": encode_peak,
        "rollout_forward": forward_peak,
        "vae_decode": decode_peak,
        "trajectory_buffer": trajectory,
        "conditioning": cond_bytes,
        "images": image_bytes,
        **_sequence_parts(run),
    }
    options = {
        "fsdp": not adapter.has_experts,  # two experts train under DDP only (the trainer refuses FSDP for them)
        "num_processes": num_processes,
        "context_parallel": context_parallel,
        "context_parallel_plan": _has_context_parallel_plan(run.adapter),
        "offload_text_encoders": args.offload_text_encoders,
        "offload_reward_models": args.offload_reward_models,
        "ema": args.ema_decay is not None,
        "ema_on_cpu": args.ema_on_cpu,
    }
    estimate = MemoryEstimate(
        model=model_args.model_name_or_path, settings=_settings(run), parts=parts, options=options, notes=notes
    )
    estimate.flops_parts = flops.parts
    estimate.flops_per_iteration = _flops_per_iteration(run, flops.parts)
    estimate.seconds = time.perf_counter() - started
    estimate.cpu_seconds = time.process_time() - started_cpu
    return estimate


def _has_context_parallel_plan(adapter) -> bool:
    from ..parallel import context_parallel_plan

    return context_parallel_plan(adapter) is not None


def sequence_tokens(latents: torch.Tensor, denoiser_config) -> int:
    """Tokens of one sample's sequence in the denoiser: packed latents `(1, S, C)` hold them as rows; otherwise the
    latent's elements over the channels and the patch (`patch_size`, and `patch_size_t` for video)."""
    if latents.dim() == 3:
        return latents.shape[1]
    patch = denoiser_config.get("patch_size", 1) or 1
    patch_volume = math.prod(patch) if isinstance(patch, (list, tuple)) else patch**2
    patch_volume *= denoiser_config.get("patch_size_t", 1) or 1
    channels = latents.shape[1]
    return math.ceil(latents.numel() / (channels * patch_volume))


def _denoiser_config(run: _Run) -> dict:
    """The denoiser's config; Wan 2.2's two experts (`adapters.wan22.WanExperts`) have none of their own, and each is
    the same architecture."""
    return dict(getattr(run.denoiser, "config", None) or run.denoiser.transformer.config)


def _sequence_parts(run: _Run) -> dict[str, int]:
    """Bytes of the whole sequence's q, k, v of one attention and of the whole prediction, per rollout and training
    forward (rows doubled with CFG): what context parallelism communicates (see `MemoryEstimate.breakdown`)."""
    config = _denoiser_config(run)
    latents = run.latents(1)
    inner = (config.get("num_attention_heads") or 0) * (config.get("attention_head_dim") or 0)
    element = torch.tensor([], dtype=run.weight_dtype).element_size()
    per_row_qkv = 3 * sequence_tokens(latents, config) * inner * element
    per_row_prediction = latents.numel() * element
    rows = 2 if run.adapter.use_cfg else 1
    return {
        "attention_qkv_rollout": rows * run.rollout_slice_size * per_row_qkv,
        "attention_qkv_train": rows * run.slice_size * per_row_qkv,
        "prediction_rollout": rows * run.rollout_slice_size * per_row_prediction,
        "prediction_train": rows * run.slice_size * per_row_prediction,
    }


def _blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP wraps: the children of the denoiser's `ModuleList`s."""
    return [block for module in denoiser.modules() if isinstance(module, torch.nn.ModuleList) for block in module]


def _settings(run: _Run) -> dict:
    args, model_args = run.args, run.model_args
    adapter = run.adapter
    settings = {
        "pipeline": type(adapter.pipeline).__name__,
        "config_source": run.config.get("source_file") or run.config["sources"][0],
        "height": adapter.height,
        "width": adapter.width,
        "dtype": str(run.weight_dtype).removeprefix("torch."),
        "lora": f"r={model_args.lora_r}" if run.is_lora else "full fine-tuning",
        "gradient_checkpointing": run.gradient_checkpointing,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "rollout_batch_size": run.rollout_slice_size,
        "training_slice": run.slice_size,
        "cfg": adapter.use_cfg,
        "num_inference_steps": args.num_inference_steps,
        "trained_steps_per_sample": run.num_train_steps,
        "reward_funcs": list(run.script_args.reward_funcs),
        "offload_text_encoders": args.offload_text_encoders,
        "cache_prompt_embeddings": args.cache_prompt_embeddings,
        "offload_reward_models": args.offload_reward_models,
        "ema_decay": args.ema_decay,
        "ema_on_cpu": args.ema_on_cpu,
    }
    settings["sequence_tokens"] = sequence_tokens(run.latents(1), _denoiser_config(run))
    if adapter.is_video:
        settings["num_frames"] = adapter.num_frames
    if adapter.has_experts:
        settings["trained_experts"] = list(adapter.experts.trained)
    return settings


def _flops_per_iteration(run: _Run, parts: dict[str, float]) -> float:
    """FLOPs of one optimizer step of one process, composed from the measured slices."""
    args = run.args
    accumulation = args.gradient_accumulation_steps
    rolled_out = run.rollout_samples * accumulation / (args.steps_per_generation * args.num_iterations)
    rollout = args.num_inference_steps * math.ceil(rolled_out / run.rollout_slice_size) * parts["rollout_forward"]
    decode = math.ceil(rolled_out / run.rollout_slice_size) * parts["decode"]
    slices = math.ceil(run.micro_batch / run.slice_size)
    training = accumulation * run.num_train_steps * slices * parts["train_forward_backward"]
    rescoring = 0.0
    if args.best_of_n or (args.algorithm in FORWARD_PROCESS_ALGORITHMS and keeps_old_velocity(args)):
        # one no-gradient forward per trained step: best-of-n's re-scoring, NFT/AWM's old velocities
        rescoring = accumulation * run.num_train_steps * slices * parts["rollout_forward"]
    return rollout + decode + training + rescoring
