"""LTX-2 image-to-video with audio (`LTX2ConditionPipeline`): the video's first frame is a dataset image, kept clean.

`LTX2ConditionPipeline` writes the VAE latents of a condition image into the first latent frame's tokens and marks them
with a per-token conditioning mask: those tokens start clean instead of noised, the transformer sees them at timestep
`t * (1 - mask) = 0`, and after each step the pipeline puts the clean condition back (it blends the guided x0 with the
condition latents by the mask before turning it into a velocity). With a full-strength first-frame condition those
tokens never change.

In our formulation they are therefore not sampled: the step moves and noises only the generated tokens (the rest of
the video and the whole audio track), the conditioned tokens are copied through unchanged, and the transition's
log-prob is the Gaussian's over the generated elements only (see docs/math.md). In the flat latent
`[video.flatten(), audio.flatten()]` of the LTX-2 adapter the first latent frame's tokens come first, so the
conditioned elements are its first `condition_size` ones.

Supported: one image per row (the dataset's `image` column) as a full-strength first-frame condition, the pipeline's
`conditions=[LTX2VideoCondition(frames=image, index=0)]`. Keyframes at later frames (which the pipeline appends as
extra tokens with their own positions) and conditions of strength below 1 are not.
"""

import torch

from .base import Conditioning
from .ltx2 import LTX2Adapter


class LTX2ConditionAdapter(LTX2Adapter):
    """LTX-2 (`LTX2ConditionPipeline`) conditioned on a first-frame image: the LTX-2 adapter with the image's latents
    in the first latent frame, per-token timesteps, and a step and log-prob over the generated tokens only."""

    pipeline_class_names = ("LTX2ConditionPipeline",)
    requires_image = True
    image_call_argument = "conditions=[LTX2VideoCondition(frames=image, index=0)]"
    image_call_import = "from diffusers.pipelines.ltx2 import LTX2VideoCondition"
    # the H.264 quality the pipeline re-compresses the image at before encoding it (`LTX2VideoCondition.crf`): `None`
    # is the pipeline's default for the checkpoint (33 for LTX-2 and 2.3, 18 for LTX-2.5; it needs PyAV), 0 skips it
    image_crf = None

    def __init__(
        self, pipeline, num_inference_steps, height=None, width=None, guidance_scale=None, shift=None, num_frames=None
    ):
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale, shift, num_frames)
        _, _, latent_height, latent_width = self.video_shape
        patch = pipeline.transformer_spatial_patch_size
        self.condition_tokens = (latent_height // patch) * (latent_width // patch)  # the first latent frame's tokens
        self.condition_size = self.condition_tokens * (self.video_size // self.video_tokens)
        from diffusers.pipelines.ltx2.utils import resolve_default_image_crf
        from diffusers.utils import is_av_available

        crf = self.image_crf if self.image_crf is not None else resolve_default_image_crf(pipeline.text_encoder)
        if crf and not is_av_available():
            raise ValueError(
                f"LTX2ConditionPipeline re-compresses each conditioning image with H.264 (CRF {crf}) before encoding "
                "it, which needs PyAV: `pip install av` (or set the adapter's `image_crf = 0` to skip it, which the "
                "pipeline then needs too: `LTX2VideoCondition(..., crf=0)`)."
            )

    def encode_images(self, images: list) -> Conditioning:
        """The packed, normalised VAE latents of each image's first frame `(N, S_1, C)`, as the pipeline's
        `prepare_latents` makes them: its preprocessing (CRF re-compression, resize to cover, centre crop), the
        distribution's mode, the VAE's latent statistics."""
        from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition, retrieve_latents

        pipeline, vae = self.pipeline, self.pipeline.vae
        device = vae.device
        latents = []
        for image in images:
            condition = LTX2VideoCondition(frames=image, index=0, strength=1.0, crf=self.image_crf)
            [pixels], _, _, _ = pipeline.preprocess_conditions(
                condition, self.height, self.width, self.num_frames, device=device
            )
            latent = retrieve_latents(vae.encode(pixels), sample_mode="argmax")
            latent = pipeline._normalize_latents(latent, vae.latents_mean, vae.latents_std).float()
            patch, patch_t = pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
            latents.append(pipeline._pack_latents(latent, patch, patch_t))
        return {"condition_latents": torch.cat(latents)}

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        """Video noise then audio noise from one generator, drawn in the packed shapes as `LTX2ConditionPipeline` draws
        them; the video noise covers the conditioned tokens too (they are replaced by `start_latents`)."""
        from diffusers.utils.torch_utils import randn_tensor

        video_shape = (num_samples, self.video_tokens, self.video_size // self.video_tokens)
        audio_shape = (num_samples, self.audio_shape[1], self.audio_shape[0] * self.audio_shape[2])
        video = randn_tensor(video_shape, generator=generator, device=device, dtype=dtype)
        audio = randn_tensor(audio_shape, generator=generator, device=device, dtype=dtype)
        return self.join(video, audio)

    def start_latents(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The first latents: the condition's clean latents in the first latent frame, the noise elsewhere."""
        condition = cond["condition_latents"].flatten(1).to(noise.dtype)
        return torch.cat([condition, noise[:, self.condition_size :]], dim=1)

    def video_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """`t * (1 - mask)` per video token, as the pipeline: 0 for the clean first frame, `t` for the others."""
        mask = torch.zeros(self.video_tokens, device=timestep.device)
        mask[: self.condition_tokens] = 1
        return timestep[:, None] * (1 - mask)

    def video_x0(self, x0_video: torch.Tensor, cond) -> torch.Tensor:
        """The pipeline's blend by the mask: the clean condition for the first frame's tokens, the guided x0 elsewhere.
        The first frame's latents are the condition (they never move), so its velocity is exactly zero."""
        condition = cond["condition_latents"].to(x0_video)
        return torch.cat([condition, x0_video[:, self.condition_tokens :]], dim=1)

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None):
        """The step of the generated elements only: the conditioned ones are copied through, draw no noise and are
        not counted in the log-prob (the mean over the generated elements of the Gaussian's log-density)."""
        n = self.condition_size
        generated = super().step(
            model_output[:, n:],
            latents[:, n:],
            step_index,
            eta,
            None if prev_sample is None else prev_sample[:, n:],
            generator,
        )
        kept = latents[:, :n]
        generated.prev_sample = torch.cat([kept, generated.prev_sample], dim=1)
        generated.prev_sample_mean = torch.cat([kept.float(), generated.prev_sample_mean], dim=1)
        return generated
