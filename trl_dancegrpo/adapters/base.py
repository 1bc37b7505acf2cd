"""The adapter interface: what the one rollout loop and the one loss need to know about a pipeline family.

An adapter wraps a diffusers pipeline and holds only what differs between families: prompt encoding, the latent
shape and packing, how the denoiser is called (timestep scaling, embedded guidance), the sampler's schedule, decoding,
and the default LoRA target modules. Classifier-free guidance, the SDE step, trajectories, advantages and the loss are
model-agnostic and live in `rollout.py` and `trainer.py`.
"""

import os
from typing import ClassVar

import torch

from ..config_checks import SDE_TYPES  # noqa: F401  (one list of the SDE variants; re-exported)
from ..sde import (
    SDEStepOutput,
    cps_step_with_logprob,
    ddim_step_with_logprob,
    flow_grpo_step_with_logprob,
    flow_sde_step_with_logprob,
    shift_sigmas,
)


Conditioning = dict[str, torch.Tensor]  # batch-first tensors, one row per prompt (or per sample once expanded)

# the noise scale of the field's SDE variants in their public recipes (Flow-GRPO: a = 0.7; Flow-GRPO's CPS: 0.8)
SDE_TYPE_DEFAULT_ETA = {"flow_grpo": 0.7, "cps": 0.8}

# the attention projections of both streams of a joint-attention (MM-DiT) block: FLUX, SD3, HunyuanVideo
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


class PipelineAdapter:
    """Base class of the per-family adapters.

    Subclasses set the class attributes and implement `encode_prompts`, `initial_noise`, `predict` and `decode`;
    the flow-matching and DDIM subclasses below implement the schedule and the step.
    """

    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "transformer"  # the pipeline attribute holding the trained model
    embedded_guidance: ClassVar[bool] = False  # guidance fed to the model (FLUX.1-dev) instead of CFG
    default_guidance_scale: ClassVar[float] = 1.0
    default_lora_target_modules: ClassVar[list[str]] = []
    is_video: ClassVar[bool] = False  # decode returns videos (N, F, 3, H, W); the adapter takes `num_frames`
    requires_image: ClassVar[bool] = False  # image-to-video and editing: each row carries a conditioning image
    default_eta: ClassVar[float] = 0.3  # the family's recipe noise level for `sde_type="dancegrpo"` (DanceGRPO's FLUX)
    sde_types: ClassVar[tuple[str, ...]] = ("dancegrpo",)  # the `sde_type`s `step` implements
    has_experts: ClassVar[bool] = False  # several denoisers, one per range of steps (Wan 2.2): takes `train_experts`
    conditioning_column: ClassVar[str] = "image"  # the dataset column of the conditioning (video-to-video: "video")
    takes_strength: ClassVar[bool] = False  # starts from the noised source (video-to-video): takes `strength`
    # how the pipeline's call takes the conditioning image `image` (the model card's example), and what that needs
    image_call_argument: ClassVar[str] = "image=image"
    image_call_import: ClassVar[str] = ""
    # conditioning whose values the denoiser branches on (HunyuanVideo 1.5: all-zero image tokens = text-to-video):
    # `estimate-memory`, whose encoders give values-free fake tensors, gives real stand-ins for them
    value_branch_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def accepts(cls, pipeline) -> bool:
        """Whether this adapter serves `pipeline`, one of a class it names: families that share a pipeline class (Wan 2.1
        and Wan 2.2's two experts) tell their checkpoints apart here."""
        return True

    def __init__(self, pipeline, num_inference_steps: int, height=None, width=None, guidance_scale=None):
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.sde_type = "dancegrpo"
        default_height, default_width = self.default_resolution()
        self.height = height or default_height
        self.width = width or default_width
        self.guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale

    # -- what the core asks of every adapter -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def task(self) -> str:
        """`text-to-image`, `image-to-image` (editing), `text-to-video` or `image-to-video` (the Hub's task names)."""
        return f"{'image' if self.requires_image else 'text'}-to-{'video' if self.is_video else 'image'}"

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance is on for models without embedded guidance when the scale is above 1."""
        return not self.embedded_guidance and self.guidance_scale > 1

    def pipeline_guidance_arguments(self) -> dict:
        """The guidance arguments of the pipeline's own call that sample as training did (for the model card)."""
        return {"guidance_scale": float(self.pipeline_guidance_scale())}

    def default_resolution(self) -> tuple[int, int]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return size, size

    def set_sde_type(self, sde_type: str) -> None:
        """Choose the stochastic step (`DanceGRPOConfig.sde_type`); a clear error for one the family lacks."""
        if sde_type not in self.sde_types:
            raise ValueError(
                f"sde_type={sde_type!r} is not available for {type(self.pipeline).__name__} (a "
                f"{'diffusion' if isinstance(self, DDIMAdapter) else type(self).__name__} model); use one of "
                f"{list(self.sde_types)}."
            )
        self.sde_type = sde_type

    def eta_for(self, sde_type: str) -> float:
        """The default noise level: the family's recipe value for DanceGRPO's step, the variant's own otherwise."""
        return SDE_TYPE_DEFAULT_ETA.get(sde_type, self.default_eta)

    def unused_parameter_prefixes(self) -> list[str]:
        """Denoiser submodules whose parameters never reach the output; the trainer keeps them frozen."""
        return []

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Pipeline components other than the denoiser (text encoders, VAE): frozen, in eval mode."""
        return {
            name: module
            for name, module in self.pipeline.components.items()
            if isinstance(module, torch.nn.Module) and name != self.denoiser_name
        }

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_conditioning(self, prompts: list[str], images: list | None = None) -> Conditioning:
        """Conditioning of rows: the prompts' embeddings, plus the images' (`encode_images`) for adapters that take a
        conditioning image (`requires_image`: image-to-video, editing).

        Keys that the unconditional branch of CFG (`negative_conditioning`) lacks, such as image latents, are shared
        by both branches.
        """
        cond = self.encode_prompts(prompts)
        if self.requires_image:
            if images is None or len(images) != len(prompts):
                raise ValueError(f"{type(self.pipeline).__name__} needs one conditioning image per prompt.")
            cond.update(self.encode_images(images))
        return cond

    def encode_images(self, images: list) -> Conditioning:
        """Conditioning of RGB PIL images (adapters with `requires_image` only), one row per image."""
        raise NotImplementedError

    def load_conditioning(self, value, row: str):
        """A row's conditioning as `encode_images` takes it (an RGB PIL image; video-to-video: a list of frames)."""
        from ..video import load_image

        return load_image(value, row)

    def conditioning_key(self, value) -> tuple:
        """A key identifying a loaded conditioning by its content (rows of a group are decoded to distinct objects)."""
        from ..video import image_key

        return image_key(value)

    def start_latents(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The rollout's first latents from the initial noise: the noise itself, except where sampling starts from a
        noised source (video-to-video)."""
        return noise

    def negative_conditioning(self) -> Conditioning:
        """The unconditional branch of CFG: the empty prompt, one row."""
        return self.encode_prompts([""])

    def guidance_batch(self, cond: Conditioning, negative_cond: Conditioning) -> Conditioning:
        """CFG's two branches as one batch, unconditional rows first.

        Keys missing from `negative_cond` (the conditioning image of image-to-video) are the same in both branches.
        Families whose conditioning varies in length (Qwen-Image's masked prompt tokens) pad here.
        """
        batch = next(iter(cond.values())).shape[0]
        both = {}
        for key, value in cond.items():
            negative = (
                negative_cond[key].expand(batch, *negative_cond[key].shape[1:]) if key in negative_cond else value
            )
            both[key] = torch.cat([negative, value])
        return both

    def predict_guided(self, denoiser, latents, step_index, cond: Conditioning, negative_cond: Conditioning):
        """The model output with classifier-free guidance: both branches in one batched forward (unconditional rows
        first, as `guidance_batch` builds them), combined by `combine_guidance`. Families whose guidance takes more
        forwards (LTX-2) override this."""
        both = self.guidance_batch(cond, negative_cond)
        output = self.predict(denoiser, torch.cat([latents, latents]), torch.cat([step_index, step_index]), both)
        uncond, text = output.float().chunk(2)
        return self.combine_guidance(uncond, text)

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The guided model output from the two branches' (float32): plain classifier-free guidance."""
        return uncond + self.guidance_scale * (cond - uncond)

    def initial_noise(self, num_samples: int, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, denoiser, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One forward of `denoiser` (possibly DDP-wrapped) on a batch; `step_index` holds each sample's step."""
        raise NotImplementedError

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None) -> SDEStepOutput:
        """One step of the sampler (`self.sde_type`) from each sample's `step_index`; `eta = 0` is deterministic."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images, a float tensor in [0, 1] of shape `(N, 3, H, W)` (videos: `(N, F, 3, H, W)`)."""
        raise NotImplementedError

    def decode_extras(self, latents: torch.Tensor) -> dict:
        """What a family decodes besides the images, handed to the rewards as keyword arguments (LTX-2: `audio`,
        `audio_sample_rate`); `{}` for most."""
        return {}

    def save_lora_weights(self, save_directory: str, lora_state_dict: dict, lora_metadata: dict | None) -> None:
        """Write diffusers-format LoRA weights that `pipeline.load_lora_weights(save_directory)` loads.

        `lora_state_dict` is PEFT's `get_peft_model_state_dict(denoiser)`; transformer-based pipelines load it as is
        (as diffusers' own FLUX training script saves it), UNet pipelines convert it (see the SD adapter).
        """
        kwargs = {f"{self.denoiser_name}_lora_layers": lora_state_dict}
        if lora_metadata is not None:
            kwargs[f"{self.denoiser_name}_lora_adapter_metadata"] = lora_metadata
        type(self.pipeline).save_lora_weights(save_directory, **kwargs)

    def load_trained_weights(self, denoiser: torch.nn.Module, folder: str, is_lora: bool) -> None:
        """Load what the trainer saved into `folder` back into `denoiser` (resuming a run): the LoRA that
        `save_lora_weights` wrote, or the full weights of `denoiser.save_pretrained`. An unreadable file is named with
        its checkpoint; missing or unexpected keys are an error."""
        from .. import checkpoints

        if not is_lora:
            try:
                saved = type(denoiser).from_pretrained(folder)
            except (OSError, ValueError, RuntimeError) as error:
                weights = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
                path = os.path.join(folder, weights[0] if weights else "config.json")
                raise checkpoints.unreadable_file_error(path, folder, error) from None
            result = denoiser.load_state_dict(saved.state_dict(), strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    f"The denoiser in {folder} does not match this run's (missing keys such as "
                    f"{result.missing_keys[:3]}, unexpected keys such as {result.unexpected_keys[:3]}); resume with the "
                    "same model."
                )
            return
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = os.path.join(folder, "pytorch_lora_weights.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{folder} holds no LoRA weights ({os.path.basename(path)}).")
        try:
            saved = load_file(path)
        except Exception as error:  # safetensors' own error type for a truncated header or body
            raise checkpoints.unreadable_file_error(path, folder, error) from None
        prefix = f"{self.denoiser_name}."
        state_dict = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(state_dict))
        checkpoints.check_loaded_keys(
            folder, getattr(result, "missing_keys", None), getattr(result, "unexpected_keys", None)
        )

    def trained_components(self) -> list[str]:
        """The pipeline components the trainer updates (the model card's loading example)."""
        return [self.denoiser_name]

    def lora_load_arguments(self, folder: str | None = None, named: bool = False) -> list[str]:
        """The arguments after the repository id of each `pipe.load_lora_weights(...)` call that restores the LoRA.

        With `folder` (such as "ema"), of the weights saved in that folder, named in `weight_name` (diffusers honours
        it for local folders and Hub repositories alike; a local folder's `subfolder` loses to a top-level file).
        `named` names the top-level file too: a Hub repository with several LoRA files would otherwise load the
        first one in alphabetical order (`ema/...` before the main one).
        """
        if folder is None and not named:
            return [""]
        return [f', weight_name="{folder + "/" if folder else ""}pytorch_lora_weights.safetensors"']

    # the call, on the pipeline, that loads the saved LoRA (the model card's); pipelines without a LoRA loader mixin
    # load it into their denoiser (`"transformer.load_lora_adapter"`)
    lora_load_method: ClassVar[str] = "load_lora_weights"

    def load_lora(self, folder: str) -> None:
        """Load the LoRA that `save_lora_weights` wrote into the pipeline (evaluation's `--adapter`)."""
        self.pipeline.load_lora_weights(folder)

    def unload_lora(self) -> None:
        """Undo `load_lora`."""
        self.pipeline.unload_lora_weights()

    def pipeline_setup(self) -> list[str]:
        """Lines the model card runs on `pipe` before sampling (guidance kept on the pipeline rather than its call)."""
        return []

    def pipeline_size_arguments(self) -> dict:
        """The size arguments of the pipeline's own call (for the model card); image-to-video pipelines that take the
        size from the image have none."""
        return {"height": self.height, "width": self.width}

    def pipeline_guidance_scale(self) -> float:
        """`guidance_scale` as the pipeline's `__call__` takes it (the model card's example); here CFG is always
        `uncond + scale * (cond - uncond)`."""
        return self.guidance_scale

    # -- shared helpers ----------------------------------------------------------------------------------------------
    def _decode_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class FlowMatchAdapter(PipelineAdapter):
    """Rectified-flow models (FLUX, SD3, HunyuanVideo, Wan): a sigma grid from 1 to 0 and the flow SDE step.

    Families set `latent_shape`, the unpacked latent of one sample, in their constructor.
    """

    latent_shape: tuple[int, ...]
    sde_types = SDE_TYPES

    def __init__(self, pipeline, num_inference_steps, height=None, width=None, guidance_scale=None, shift=None):
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale)
        self.shift = shift
        self.sigmas = self.make_sigmas().float()  # T + 1 values, sigmas[0] = 1 (or the scheduler's), sigmas[-1] = 0

    def make_sigmas(self) -> torch.Tensor:
        steps = self.num_inference_steps
        if self.shift is not None:
            return shift_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float64), self.shift)
        return self.scheduler_sigmas()

    def scheduler_sigmas(self) -> torch.Tensor:
        """The pipeline scheduler's own sigmas for this resolution; families override to pass their arguments."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(self.num_inference_steps)
        return scheduler.sigmas.double().cpu()

    def scheduler_sigmas_from(self, sigmas, mu: float) -> torch.Tensor:
        """The scheduler's sigmas for a given grid and resolution shift `mu`, as the pipelines' own
        `retrieve_timesteps(scheduler, sigmas=..., mu=mu)` (Z-Image, FLUX.2): schedulers without dynamic shifting
        ignore `mu` and apply their fixed shift."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(self.num_inference_steps if sigmas is None else None, sigmas=sigmas, mu=mu)
        return scheduler.sigmas.double().cpu()

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((num_samples, *self.latent_shape), generator=generator, device=device, dtype=dtype)

    def timestep(self, step_index: torch.Tensor, device) -> torch.Tensor:
        """The denoiser's timestep for models that take sigma scaled to the scheduler's training range (sigma * 1000)."""
        num_train_timesteps = self.pipeline.scheduler.config.get("num_train_timesteps", 1000)
        return self.sigmas.to(device)[step_index] * num_train_timesteps

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None) -> SDEStepOutput:
        sigmas = self.sigmas.to(latents.device)
        sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
        if self.sde_type == "flow_grpo":
            return flow_grpo_step_with_logprob(
                model_output, latents, sigma, sigma_next, eta, sigmas[1], prev_sample, generator
            )
        step = cps_step_with_logprob if self.sde_type == "cps" else flow_sde_step_with_logprob
        return step(model_output, latents, sigma, sigma_next, eta, prev_sample, generator)


class DDIMAdapter(PipelineAdapter):
    """Diffusion models sampled with DDIM (eta > 0 makes it stochastic); DDIM is their only `sde_type`."""

    default_eta = 1.0  # DanceGRPO's Stable Diffusion recipe samples with DDIM eta 1

    def __init__(self, pipeline, num_inference_steps, height=None, width=None, guidance_scale=None, shift=None):
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale)
        if shift is not None:
            raise ValueError("`shift` applies to rectified-flow models only; leave it unset for a DDIM model.")
        from diffusers import DDIMScheduler

        # DanceGRPO samples Stable Diffusion with DDIM whatever scheduler the checkpoint ships with.
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = self.scheduler.timesteps.clone()

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None) -> SDEStepOutput:
        timestep = self.timesteps.to(latents.device)[step_index]
        return ddim_step_with_logprob(self.scheduler, model_output, timestep, latents, eta, prev_sample, generator)


class WanVAELatentsMixin:
    """Adapters whose latents live in the space of a Wan-family VAE (Wan, Qwen-Image): per-channel statistics from
    the VAE config map them to the VAE's latents (`latents * std + mean`)."""

    def _latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std
