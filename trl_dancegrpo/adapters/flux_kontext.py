"""FLUX.1 Kontext (`FluxKontextPipeline`): instruction-based editing on FLUX.1; the source image's tokens follow the
noisy latent's, at RoPE positions whose first coordinate is 1 (the noisy tokens' is 0)."""

import torch

from .flux import FluxAdapter
from .image_base import ReferenceImageMixin


class FluxKontextAdapter(ReferenceImageMixin, FluxAdapter):
    """FLUX.1 Kontext [dev]: embedded guidance (diffusers' default 3.5), everything else as FLUX.1.

    The source image is resized to the training size (the pipeline picks one of Kontext's preferred resolutions near
    1024x1024 instead; training at one size keeps the rows of a batch stackable).
    """

    pipeline_class_names = ("FluxKontextPipeline",)

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        reference_ids = pipeline._prepare_latent_image_ids(1, *self.token_grid, "cpu", torch.float32)
        reference_ids[..., 0] = 1  # as FluxKontextPipeline.prepare_latents
        self.token_ids = torch.cat([self.token_ids, reference_ids])

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixels).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor
