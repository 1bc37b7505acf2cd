"""What the video adapters share: the frame count, 5-D latents `(N, C, F', h, w)`, decoding to `(N, F, 3, H, W)`,
and the preprocessing of conditioning images for image-to-video."""

from typing import ClassVar

import torch

from .base import Conditioning, FlowMatchAdapter


class VideoAdapter(FlowMatchAdapter):
    """Base of the rectified-flow video adapters (HunyuanVideo, SkyReels, Wan).

    Subclasses set `default_num_frames` and `default_size`, and give `latent_channels`, `spatial_patch_size`,
    `encode_prompts`, `predict`, `latents_to_vae` (undo the latent normalisation) and, for image-to-video
    (`requires_image = True`), `encode_images` and `model_input`.
    """

    is_video = True
    default_num_frames: ClassVar[int] = 49
    default_size: ClassVar[tuple[int, int]] = (480, 480)

    def __init__(
        self,
        pipeline,
        num_inference_steps,
        height=None,
        width=None,
        guidance_scale=None,
        shift=None,
        num_frames=None,
    ):
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale, shift)
        self.num_frames = num_frames or self.default_num_frames
        temporal, spatial = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        name = type(pipeline).__name__
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            suggestion = (max(self.num_frames - 1, 0) // temporal) * temporal + 1
            raise ValueError(
                f"{name} needs num_frames = 1 + {temporal} * k (its VAE compresses time {temporal}x), got "
                f"{self.num_frames}; use e.g. {suggestion} or {suggestion + temporal}."
            )
        multiple = spatial * self.spatial_patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"{name} needs height and width divisible by {multiple}, got {self.height}x{self.width}.")
        latent_frames = (self.num_frames - 1) // temporal + 1
        self.latent_shape = (self.latent_channels, latent_frames, self.height // spatial, self.width // spatial)

    # -- per family --------------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def spatial_patch_size(self) -> int:
        raise NotImplementedError

    def latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the family's latent normalisation before `vae.decode`."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------------
    def default_resolution(self) -> tuple[int, int]:
        return self.default_size

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """What the denoiser takes as `hidden_states`: the latents (image-to-video adds the image latents)."""
        return latents

    def preprocess_images(self, images: list) -> torch.Tensor:
        """PIL images to `(N, 3, H, W)` in [-1, 1] at the training size, as the pipeline's own `__call__` does."""
        processor = self.pipeline.video_processor
        return torch.cat([processor.preprocess(image, height=self.height, width=self.width) for image in images])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to videos `(N, F, 3, H, W)` in [0, 1]."""
        vae = self.pipeline.vae
        video = vae.decode(self.latents_to_vae(latents.to(vae.dtype)), return_dict=False)[0]  # (N, 3, F, H, W)
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()
