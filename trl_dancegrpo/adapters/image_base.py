"""What the packed-latent image families share (FLUX.1, FLUX.1 Kontext, Qwen-Image, Qwen-Image-Edit): 2x2 latent
patches packed into tokens, the pipelines' resolution-dependent schedule shift, and, for editing, the source image's
tokens appended to the noisy ones."""

import torch

from .base import Conditioning, FlowMatchAdapter


class PackedLatentAdapter(FlowMatchAdapter):
    """Image transformers that take the latent as a sequence of 2x2 patches (`pipeline._pack_latents`).

    Subclasses give `latent_channels` (of the unpacked latent) and `predict` / `decode`; `unpack` undoes the packing.
    """

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels // 4

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        vae_scale = pipeline.vae_scale_factor
        # packing 2x2 latent patches needs latent sides divisible by 2
        if self.height % (vae_scale * 2) or self.width % (vae_scale * 2):
            raise ValueError(
                f"{type(pipeline).__name__} needs height and width divisible by {vae_scale * 2}, got "
                f"{self.height}x{self.width}."
            )
        self.latent_shape = (self.latent_channels, self.height // vae_scale, self.width // vae_scale)

    @property
    def token_grid(self) -> tuple[int, int]:
        """Height and width of the latent in packed tokens (2x2 patches)."""
        return self.latent_shape[1] // 2, self.latent_shape[2] // 2

    def scheduler_sigmas(self) -> torch.Tensor:
        # exactly what FluxPipeline and QwenImagePipeline do: their sigma grid, shifted by `mu` for this image size
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler, steps = self.pipeline.scheduler, self.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        vae_scale = self.pipeline.vae_scale_factor
        mu = calculate_shift(
            (self.height // vae_scale // 2) * (self.width // vae_scale // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        if scheduler.config.get("use_dynamic_shifting", False):
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas)
        return scheduler.sigmas.double().cpu()

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """`(N, C, h, w)` latents to `(N, h * w / 4, 4 * C)` tokens."""
        return self.pipeline._pack_latents(latents, latents.shape[0], *latents.shape[1:])

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline._unpack_latents(latents, self.height, self.width, self.pipeline.vae_scale_factor)

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        return self.pack(super().initial_noise(num_samples, generator, device, dtype))

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's `hidden_states`: the noisy tokens (editing appends the source image's)."""
        return latents


class ReferenceImageMixin:
    """Instruction-based editing: each row has a source image, which the transformer sees as extra tokens.

    The source image is resized to the training size, encoded by the VAE (the posterior's mode, as the pipelines do,
    so every sample of a group sees exactly the same source), normalised as the family's latents and packed; its
    tokens follow the noisy latent's in `hidden_states`, and only the noisy tokens' prediction is kept (as
    `FluxKontextPipeline` and `QwenImageEditPipeline`). Both CFG branches see the source. Families give
    `encode_reference` (pixels to normalised latents `(N, C, h, w)`).
    """

    requires_image = True

    def preprocess_images(self, images: list) -> torch.Tensor:
        """RGB PIL images to `(N, 3, H, W)` in [-1, 1] at the training size (the pipeline's image processor)."""
        processor = self.pipeline.image_processor
        return torch.cat([processor.preprocess(image, height=self.height, width=self.width) for image in images])

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, images: list) -> Conditioning:
        vae = self.pipeline.vae
        with torch.no_grad():
            latents = self.encode_reference(self.preprocess_images(images).to(vae.device, vae.dtype))
        return {"image_latents": self.pack(latents).float()}

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return torch.cat([latents, cond["image_latents"].to(latents.dtype)], dim=1)
