"""Qwen-Image text-to-image (`QwenImagePipeline`) and editing (`QwenImageEditPipeline`, `QwenImageEditPlusPipeline`):
a Qwen2.5-VL prompt encoder (which also sees the source image when editing), packed 2x2 latents normalised per
channel, and true classifier-free guidance with a norm rescale."""

import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, WanVAELatentsMixin
from .image_base import PackedLatentAdapter, ReferenceImageMixin


PROMPT_KEYS = ("prompt_embeds", "prompt_embeds_mask")


def pad_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad a batch-first token sequence (embeddings or their mask) with zeros to `length` tokens."""
    padding = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, padding], dim=1)


class QwenImageAdapter(WanVAELatentsMixin, PackedLatentAdapter):
    """Qwen-Image. Prompts go through the pipeline's own `encode_prompt` (its system template, whose tokens are
    dropped from the hidden states); they vary in length, so every row carries its mask (`prompt_embeds_mask`) and
    shorter rows are zero-padded.

    Without guidance by default, as DanceGRPO's Qwen-Image recipe (and `QwenImagePipeline` called without a negative
    prompt). `guidance_scale > 1` trains with the pipeline's true CFG: the negative prompt `" "`, and the guided
    prediction rescaled, token by token, to the norm of the conditional one.
    """

    pipeline_class_names = ("QwenImagePipeline",)
    default_guidance_scale = 1.0
    default_eta = 0.3  # the DanceGRPO code's Qwen-Image and Qwen-Image-Edit recipes
    negative_prompt = " "  # what diffusers' Qwen-Image examples pass to turn true CFG on
    max_sequence_length = 512  # prompt tokens after the template, QwenImagePipeline's default
    default_lora_target_modules = [
        *JOINT_ATTENTION_LORA_TARGETS,
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ]

    def __init__(self, pipeline, *args, **kwargs):
        config = pipeline.transformer.config
        if config.get("guidance_embeds", False) or config.get("use_additional_t_cond", False):
            raise ValueError(
                f"{type(pipeline).__name__} with a guidance-distilled or `use_additional_t_cond` transformer is not "
                "supported; use a Qwen-Image / Qwen-Image-Edit checkpoint."
            )
        super().__init__(pipeline, *args, **kwargs)

    def pipeline_guidance_arguments(self) -> dict:
        # the pipeline's true CFG needs a negative prompt; its `guidance_scale` is for guidance-distilled models
        if self.use_cfg:
            return {"true_cfg_scale": float(self.guidance_scale), "negative_prompt": self.negative_prompt}
        return {"true_cfg_scale": 1.0}

    def unused_parameter_prefixes(self) -> list[str]:
        # the text stream's output of the last block is discarded: its text queries, attention output and MLP
        # reach nothing (the text keys and values do)
        last = f"transformer_blocks.{len(self.pipeline.transformer.transformer_blocks) - 1}"
        return [f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q", f"{last}.attn.to_add_out", f"{last}.txt_mlp"]

    # -- prompts -----------------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], images: list | None = None) -> Conditioning:
        pipeline = self.pipeline
        kwargs = {"image": images} if images is not None else {}
        embeds, mask = pipeline.encode_prompt(
            prompt=prompts,
            device=pipeline.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
            **kwargs,
        )
        if mask is None:  # the pipeline drops an all-ones mask; rows are padded to other lengths later
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self._encode(prompts)

    def negative_conditioning(self) -> Conditioning:
        return self.encode_prompts([self.negative_prompt])

    def guidance_batch(self, cond: Conditioning, negative_cond: Conditioning) -> Conditioning:
        # per-row negative prompts (editing: they see the row's source image) take the place of the shared one
        negative = {
            **negative_cond,
            **{key: cond[f"negative_{key}"] for key in PROMPT_KEYS if f"negative_{key}" in cond},
        }
        length = max(cond["prompt_embeds"].shape[1], negative["prompt_embeds"].shape[1])
        padded = {key: pad_tokens(cond[key], length) for key in PROMPT_KEYS}
        negative.update({key: pad_tokens(negative[key], length) for key in PROMPT_KEYS})
        return super().guidance_batch({**cond, **padded}, negative)

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # as QwenImagePipeline: the guided prediction rescaled to the conditional one's norm, per token
        guided = super().combine_guidance(uncond, cond)
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    # -- the transformer ---------------------------------------------------------------------------------------------
    def image_shapes(self) -> list[tuple[int, int, int]]:
        """The (frames, height, width) in tokens of each image in `model_input`: the noisy latent (editing adds the
        source image, at the same size)."""
        return [(1, *self.token_grid)]

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        sigma = self.sigmas.to(latents.device)[step_index]
        output = denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=sigma.to(latents.dtype),  # the pipeline passes t / 1000 = sigma
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[self.image_shapes()] * latents.shape[0],
            return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]  # the noisy tokens' prediction

    # -- latents -----------------------------------------------------------------------------------------------------
    def decode(self, latents) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = self.unpack(latents).to(vae.dtype)  # (N, C, 1, h, w): the VAE is a video VAE
        mean, std = self._latent_statistics(latents)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class QwenImageEditAdapter(ReferenceImageMixin, QwenImageAdapter):
    """Qwen-Image-Edit: the prompt encoder sees the source image (at the training size, as the pipeline shows it the
    image it encodes), and the source image's latents follow the noisy ones as tokens.

    The pipeline resizes the source to about 1024x1024 pixels whatever the output size; here it is resized to the
    training size, so the rows of a batch stack and the source costs as many tokens as the output (Flow-GRPO's
    Qwen-Image-Edit training does the same at 512x512). With CFG the negative prompt sees the source image too, so it
    is encoded per row.
    """

    pipeline_class_names = ("QwenImageEditPipeline",)

    def encoder_images(self, images: list) -> list:
        """The source images as the prompt encoder sees them."""
        return [self.pipeline.image_processor.resize(image, self.height, self.width) for image in images]

    def encode_rows(self, prompts: list[str], images: list) -> Conditioning:
        return self._encode(prompts, images)

    def encode_conditioning(self, prompts: list[str], images: list | None = None) -> Conditioning:
        if images is None or len(images) != len(prompts):
            raise ValueError(f"{type(self.pipeline).__name__} needs one source image per prompt.")
        encoder_images = self.encoder_images(images)
        cond = self.encode_rows(prompts, encoder_images)
        if self.use_cfg:
            negative = self.encode_rows([self.negative_prompt] * len(prompts), encoder_images)
            cond.update({f"negative_{key}": value for key, value in negative.items()})
        cond.update(self.encode_images(images))
        return cond

    def negative_conditioning(self) -> Conditioning:
        return {}  # the negative prompt depends on the row's image: it is part of the rows' conditioning

    def image_shapes(self) -> list[tuple[int, int, int]]:
        return [(1, *self.token_grid)] * 2

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        # the pipeline's own encoding (the posterior's mode, normalised per channel) of one-frame videos
        return self.pipeline._encode_vae_image(pixels.unsqueeze(2), generator=None)[:, :, 0]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509 and later: the prompt encoder sees the source at about 384x384 pixels (the pipeline's
    `CONDITION_IMAGE_SIZE`, at the training aspect ratio) behind a "Picture 1:" label. One source image per row.

    The pipeline encodes the label for every image it is given, so rows are encoded one at a time.
    """

    pipeline_class_names = ("QwenImageEditPlusPipeline",)

    def encoder_images(self, images: list) -> list:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            calculate_dimensions,
        )

        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, self.width / self.height)
        return [self.pipeline.image_processor.resize(image, height, width) for image in images]

    def encode_rows(self, prompts: list[str], images: list) -> Conditioning:
        rows = [self._encode([prompt], [image]) for prompt, image in zip(prompts, images)]
        length = max(row["prompt_embeds"].shape[1] for row in rows)
        return {key: torch.cat([pad_tokens(row[key], length) for row in rows]) for key in PROMPT_KEYS}
