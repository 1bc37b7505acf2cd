"""HunyuanVideo text-to-video (`HunyuanVideoPipeline`) and SkyReels-V1 image-to-video
(`HunyuanSkyreelsImageToVideoPipeline`, the image-to-video model DanceGRPO trains): one transformer architecture,
Llama + CLIP prompts, unpacked 5-D latents."""

import functools

import numpy as np
import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning
from .video_base import VideoAdapter


class HunyuanVideoAdapter(VideoAdapter):
    """HunyuanVideo: embedded guidance (guidance-distilled, no CFG at training time, as in DanceGRPO)."""

    pipeline_class_names = ("HunyuanVideoPipeline",)
    default_guidance_scale = 6.0  # diffusers' HunyuanVideoPipeline default for the embedded guidance
    default_num_frames = 53  # DanceGRPO's HunyuanVideo recipe: 480x480x53
    default_size = (480, 480)
    default_lora_target_modules = list(JOINT_ATTENTION_LORA_TARGETS)
    default_eta = 0.25  # DanceGRPO's HunyuanVideo recipe
    max_sequence_length = 256  # Llama prompt tokens after the template, as HunyuanVideoPipeline
    embedded_guidance_value = 1.0  # what the guidance embedding gets when training with CFG instead (SkyReels)

    @property
    def embedded_guidance(self) -> bool:  # a model without a guidance embedding gets CFG if asked for
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        # The prompt goes into the system template the model was trained with; the template's tokens are cropped
        # from the hidden states. diffusers hard-codes the crop (95 tokens for HunyuanVideo's Llama-3 tokenizer);
        # counting the tokens before the placeholder gives that number with any tokenizer (e.g. the tiny test one).
        template = DEFAULT_PROMPT_TEMPLATE["template"]
        prefix = template.split("{}")[0]
        crop_start = len(pipeline.tokenizer(prefix, return_attention_mask=False)["input_ids"])
        self.prompt_template = {"template": template, "crop_start": crop_start}

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels

    @property
    def spatial_patch_size(self) -> int:
        return self.pipeline.transformer.config.patch_size

    def scheduler_sigmas(self) -> torch.Tensor:
        # as HunyuanVideoPipeline.__call__: linspace(1, 0) handed to the scheduler, which applies its shift
        scheduler, steps = self.pipeline.scheduler, self.num_inference_steps
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        return scheduler.sigmas.double().cpu()

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # small tokenizers (the tiny test models) cap the prompt length lower
        max_length = min(self.max_sequence_length, self.pipeline.tokenizer.model_max_length)
        prompt_embeds, pooled, mask = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_template=self.prompt_template,
            device=self.pipeline.text_encoder.device,
            max_sequence_length=max_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}

    def guidance(self, latents: torch.Tensor) -> torch.Tensor | None:
        if not self.pipeline.transformer.config.guidance_embeds:
            return None
        value = self.guidance_scale if self.embedded_guidance else self.embedded_guidance_value
        # as HunyuanVideoPipeline: the scale in the transformer's (compute) dtype, times 1000 in that dtype; in bf16
        # 6.0 * 1000 rounds to 6016, the value the model and DanceGRPO's reference see
        device_type = latents.device.type
        dtype = self.pipeline.transformer.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        return torch.full((latents.shape[0],), value, device=latents.device, dtype=dtype) * 1000.0

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=self.timestep(step_index, latents.device),  # HunyuanVideo takes t = sigma * 1000
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            pooled_projections=cond["pooled_prompt_embeds"],
            guidance=self.guidance(latents),
            return_dict=False,
        )[0]

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipeline.vae.config.scaling_factor

    # -- context parallelism (diffusers has no `_cp_plan` for HunyuanVideoTransformer3DModel) --------------------------
    # The forward embeds the whole sequence first: the token refiner pools and self-attends over the whole (padded)
    # prompt, and the joint attention mask `[B, 1, 1, image + text]` is built from the whole prompt's length. So the
    # split comes after them, at the first double-stream block's inputs (image and text tokens, each in equal chunks),
    # with the image rotary embeddings split alike at `rope`; `proj_out`'s image tokens are gathered. The mask is the
    # one input a plan cannot split: see `prepare_context_parallel`.
    context_parallel_types = ("ulysses",)  # the joint mask needs Ulysses: diffusers' ring path takes no mask

    @property
    def cp_plan(self) -> dict:
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
        rotary = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        return {
            "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "rope": {0: rotary, 1: rotary},  # (cos, sin), one row per image token
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def prepare_context_parallel(self, denoiser) -> None:
        """Give each joint attention the mask of the keys it holds (after `enable_parallelism`).

        A process holds chunk `r` of the image tokens and chunk `r` of the text tokens, and attends over
        `[image_r, text_r]`; Ulysses' all-to-all gathers the keys rank after rank, `[image_0, text_0, image_1, ...]`,
        and all-gathers a mask of the local key length the same way. The forward's mask covers `[image, text]` in the
        original order, so each block's attention gets its own slice of it, `[mask(image_r), mask(text_r)]`: the
        gathered mask is then the one of the gathered keys, and the padded prompt tokens stay masked exactly.
        """
        mesh = denoiser._parallel_config.context_parallel_config._flattened_mesh
        rank, size = torch.distributed.get_rank(mesh.get_group()), mesh.size()
        hook = functools.partial(_local_joint_attention_mask, rank=rank, size=size)
        for block in [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]:
            block.attn.register_forward_pre_hook(hook, with_kwargs=True)


def local_joint_attention_mask(mask: torch.Tensor, image: int, text: int, rank: int, size: int) -> torch.Tensor:
    """The part of `mask` (`[..., size * (image + text)]`, image tokens then text tokens) that covers chunk `rank` of
    the image tokens and chunk `rank` of the text tokens (`image` and `text` tokens each), in that order."""
    if mask.shape[-1] != size * (image + text):
        raise ValueError(f"a joint mask of {mask.shape[-1]} keys for {size} x ({image} + {text}) tokens")
    image_start, text_start = rank * image, size * image + rank * text
    return torch.cat([mask[..., image_start : image_start + image], mask[..., text_start : text_start + text]], -1)


def _local_joint_attention_mask(module, args, kwargs, rank: int, size: int):
    mask = kwargs.get("attention_mask")
    if mask is None:
        return None
    image, text = kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1]
    return args, {**kwargs, "attention_mask": local_joint_attention_mask(mask, image, text, rank, size)}


class SkyReelsImageToVideoAdapter(HunyuanVideoAdapter):
    """SkyReels-V1 image-to-video: the image's latents (first frame, zeros after) concatenated on the channels.

    SkyReels is trained with true classifier-free guidance (diffusers' default `true_cfg_scale=6.0`), so training runs
    with CFG: both branches see the conditioning image, only the prompt differs. The guidance embedding gets 1.0, as
    in diffusers' pipeline.
    """

    pipeline_class_names = ("HunyuanSkyreelsImageToVideoPipeline",)
    requires_image = True
    embedded_guidance = False  # CFG; the guidance embedding gets `embedded_guidance_value`
    default_guidance_scale = 6.0  # diffusers' `true_cfg_scale` default for SkyReels
    default_num_frames = 97  # diffusers' HunyuanSkyreelsImageToVideoPipeline defaults: 544x960x97
    default_size = (544, 960)
    default_eta = 0.3  # DanceGRPO's SkyReels-I2V script (finetune_skyreels_i2v.sh: --eta 0.3 --shift 7)

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels // 2

    def pipeline_guidance_arguments(self) -> dict:
        # the pipeline's true CFG runs only with a negative prompt (ours: the empty prompt); its `guidance_scale` is
        # the guidance embedding's value
        arguments = {"true_cfg_scale": float(self.guidance_scale), "guidance_scale": self.embedded_guidance_value}
        return {**arguments, "negative_prompt": ""} if self.use_cfg else arguments

    def encode_images(self, images: list) -> Conditioning:
        vae = self.pipeline.vae
        pixels = self.preprocess_images(images).to(vae.device, vae.dtype).unsqueeze(2)  # (N, 3, 1, H, W)
        # The distribution's mode, not a sample (diffusers samples): one fixed conditioning per image, shared by the
        # samples of its group, so advantages compare samples under identical conditions.
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        return {"image_latents": latents.float()}  # (N, C, 1, h, w): the first latent frame; padded in `model_input`

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        image = cond["image_latents"].to(latents.dtype)
        padding = image.new_zeros(*image.shape[:2], latents.shape[2] - 1, *image.shape[3:])
        return torch.cat([latents, torch.cat([image, padding], dim=2)], dim=1)
