"""Wan 2.1 text-to-video (`WanPipeline`) and image-to-video (`WanImageToVideoPipeline`): UMT5 prompts, unpacked 5-D
latents normalised per channel, classifier-free guidance."""

import torch

from .base import Conditioning
from .video_base import VideoAdapter


class WanAdapter(VideoAdapter):
    """Wan 2.1 text-to-video, trained with CFG (the model has no guidance embedding)."""

    pipeline_class_names = ("WanPipeline",)
    default_guidance_scale = 5.0  # diffusers' WanPipeline default
    default_num_frames = 81  # diffusers' defaults: 480x832x81
    default_size = (480, 832)
    max_sequence_length = 512  # UMT5 tokens, as WanPipeline (Wan 2.1 I2V's cross-attention assumes exactly 512)
    default_lora_target_modules = [
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
        "attn2.add_k_proj",
        "attn2.add_v_proj",
        "ffn.net.0.proj",
        "ffn.net.2",
    ]

    def __init__(self, pipeline, *args, **kwargs):
        config = pipeline.config
        if getattr(pipeline, "transformer_2", None) is not None or config.get("expand_timesteps", False):
            raise ValueError(
                "Wan 2.2 pipelines (two-stage `transformer_2`, or `expand_timesteps`) are not supported; use a Wan 2.1 "
                "checkpoint (one transformer)."
            )
        super().__init__(pipeline, *args, **kwargs)

    @property
    def latent_channels(self) -> int:
        return self.pipeline.vae.config.z_dim

    @property
    def spatial_patch_size(self) -> int:
        return self.pipeline.transformer.config.patch_size[1]

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        max_length = min(self.max_sequence_length, self.pipeline.tokenizer.model_max_length)
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=self.pipeline.text_encoder.device,
        )
        return {"prompt_embeds": prompt_embeds}

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=self.timestep(step_index, latents.device),  # Wan takes t = sigma * 1000
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_image=cond.get("image_embeds"),
            return_dict=False,
        )[0]

    def _latent_statistics(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipeline.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_statistics(latents)
        return latents * std + mean


class WanImageToVideoAdapter(WanAdapter):
    """Wan 2.1 image-to-video: the latents of the image followed by black frames, and a first-frame mask, concatenated
    on the channels (as `WanImageToVideoPipeline`); plus CLIP image features for models with `image_dim`. Both CFG
    branches see the image."""

    pipeline_class_names = ("WanImageToVideoPipeline",)
    requires_image = True

    def encode_images(self, images: list) -> Conditioning:
        pipeline = self.pipeline
        device = pipeline.text_encoder.device
        conditions = []
        for pixels in self.preprocess_images(images):
            # the pipeline's own preparation (mode of the VAE posterior, normalised, with the mask channels); the
            # placeholder latents only stop it from drawing noise
            placeholder = torch.zeros(1, *self.latent_shape, device=device)
            _, condition = pipeline.prepare_latents(
                pixels[None].to(device, torch.float32),
                1,
                self.latent_channels,
                self.height,
                self.width,
                self.num_frames,
                torch.float32,
                device,
                None,
                placeholder,
            )
            conditions.append(condition)
        cond = {"image_condition": torch.cat(conditions)}
        if pipeline.transformer.config.image_dim is not None:  # Wan 2.1 I2V: CLIP image features too
            cond["image_embeds"] = pipeline.encode_image(images, device)
        return cond

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return torch.cat([latents, cond["image_condition"].to(latents.dtype)], dim=1)
