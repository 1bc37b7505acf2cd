"""Wan 2.1 video-to-video (`WanVideoToVideoPipeline`): Wan's text-to-video transformer, started from the source video's
latents noised to the first step that `strength` keeps, with classifier-free guidance as `WanPipeline`."""

import torch

from .base import Conditioning
from .wan import WanAdapter


class WanVideoToVideoAdapter(WanAdapter):
    """Each row has a source `video` (frames or a file path). As `WanVideoToVideoPipeline`: the grid is the scheduler's
    for `num_inference_steps`, of which the last `int(num_inference_steps * strength)` steps are run; the source is
    resized to the training size, encoded by the VAE (the posterior's mode, normalised per channel) and noised to the
    first kept sigma, `sigma * noise + (1 - sigma) * latents`. Both CFG branches start from the same latents."""

    pipeline_class_names = ("WanVideoToVideoPipeline",)
    requires_image = True  # a conditioning per row: here the source video
    conditioning_column = "video"
    takes_strength = True
    default_strength = 0.8  # WanVideoToVideoPipeline's default

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return True

    @property
    def task(self) -> str:
        return "video-to-video"

    def __init__(self, pipeline, num_inference_steps, *args, strength=None, **kwargs):
        self.strength = self.default_strength if strength is None else strength
        kept = min(int(num_inference_steps * self.strength), num_inference_steps)
        if kept < 1:
            raise ValueError(
                f"strength={self.strength} with num_inference_steps={num_inference_steps} keeps no step "
                f"(int(steps * strength) = 0); raise strength or num_inference_steps."
            )
        super().__init__(pipeline, num_inference_steps, *args, **kwargs)
        # as the pipeline's get_timesteps: drop the first steps of the full grid
        self.grid_steps = num_inference_steps
        self.sigmas = self.sigmas[num_inference_steps - kept :]
        self.num_inference_steps = kept

    def load_conditioning(self, value, row: str) -> list:
        from ..video import load_video

        frames = load_video(value, row)
        if len(frames) < self.num_frames:
            raise ValueError(
                f"{row}: its video has {len(frames)} frames, fewer than num_frames={self.num_frames}; give longer "
                "videos or a smaller num_frames."
            )
        return frames[: self.num_frames]

    def conditioning_key(self, value) -> tuple:
        from ..video import video_key

        return video_key(value)

    def encode_images(self, videos: list) -> Conditioning:
        pipeline, vae = self.pipeline, self.pipeline.vae
        device = pipeline.text_encoder.device
        latents = []
        for frames in videos:
            # as the pipeline's preprocess_video, frame by frame (each frame is what the estimate's fake tensors keep
            # real): (F, 3, H, W) in [-1, 1] to (1, 3, F, H, W)
            pixels = self.preprocess_images(frames).permute(1, 0, 2, 3)[None]
            encoded = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode().float()  # the pipeline's "argmax"
            mean, std = self._latent_statistics(encoded)
            latents.append((encoded - mean) / std)
        return {"video_latents": torch.cat(latents)}

    def start_latents(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = self.sigmas[0].item()
        return sigma * noise + (1 - sigma) * cond["video_latents"].to(noise)

    def pipeline_guidance_arguments(self) -> dict:
        # the pipeline's call keeps the same steps only with the same grid and strength
        return {
            **super().pipeline_guidance_arguments(),
            "strength": self.strength,
            "num_inference_steps": self.grid_steps,
        }
