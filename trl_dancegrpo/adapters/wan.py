"""Wan 2.1 and Wan 2.2 TI2V-5B text-to-video (`WanPipeline`) and Wan 2.1 image-to-video (`WanImageToVideoPipeline`):
UMT5 prompts, unpacked 5-D latents normalised per channel, classifier-free guidance. Wan 2.2's two-expert checkpoints
are served by `wan22.py`."""

import torch

from .base import Conditioning, WanVAELatentsMixin
from .video_base import VideoAdapter


class WanAdapter(WanVAELatentsMixin, VideoAdapter):
    """Wan text-to-video with one transformer (Wan 2.1; Wan 2.2 TI2V-5B, whose `expand_timesteps` gives every latent
    token its own timestep), trained with CFG (the model has no guidance embedding)."""

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

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return getattr(pipeline, "transformer_2", None) is None  # two experts: Wan22Adapter

    def __init__(self, pipeline, *args, **kwargs):
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError(f"This {type(pipeline).__name__} has no `transformer`: load the checkpoint with it.")
        self.expand_timesteps = bool(pipeline.config.get("expand_timesteps", False))
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

    def model_timestep(self, step_index: torch.Tensor, device) -> torch.Tensor:
        """Wan takes t = sigma * 1000; with `expand_timesteps` (TI2V-5B) one per latent token, as `WanPipeline`."""
        timestep = self.timestep(step_index, device)
        if not self.expand_timesteps:
            return timestep
        _, frames, height, width = self.latent_shape
        patch = self.pipeline.transformer.config.patch_size
        num_tokens = (frames // patch[0]) * (height // patch[1]) * (width // patch[2])
        return timestep[:, None].expand(-1, num_tokens)

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=self.model_timestep(step_index, latents.device),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_image=cond.get("image_embeds"),
            return_dict=False,
        )[0]

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_statistics(latents)
        return latents * std + mean


class WanImageToVideoAdapter(WanAdapter):
    """Wan 2.1 image-to-video: the latents of the image followed by black frames, and a first-frame mask, concatenated
    on the channels (as `WanImageToVideoPipeline`); plus CLIP image features for models with `image_dim`. Both CFG
    branches see the image."""

    pipeline_class_names = ("WanImageToVideoPipeline",)
    requires_image = True

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return True  # Wan 2.2 image-to-video checkpoints get the constructor's explanation

    def __init__(self, pipeline, *args, **kwargs):
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("expand_timesteps", False):
            raise ValueError(
                "Wan 2.2 image-to-video (two experts, or TI2V-5B's `expand_timesteps`) is not supported; use a Wan 2.1 "
                "image-to-video checkpoint, or Wan 2.2 text-to-video (WanPipeline)."
            )
        super().__init__(pipeline, *args, **kwargs)

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
