"""LTX-2 text-to-video with audio (`LTX2Pipeline`): one transformer denoises a video and its audio track together.

The two latents (the packed video tokens `(S_v, C_v)` and the packed audio tokens `(L, C_a * M)`) live side by side in
one flat latent per sample, `[video.flatten(), audio.flatten()]`, so the one rollout loop, the stored trajectories and
the SDE step handle them unchanged. The pipeline steps both with the same sigmas (a copy of its scheduler, set with the
same `sigmas` and `mu`), so one step of the flat latent is exactly the two steps; its log-prob is the joint Gaussian's
over both latents (see docs/math.md).

Guidance is the pipeline's own, computed in x0 space: CFG (one batched forward of both branches, video and audio each
with its scale), spatio-temporal guidance (a forward with the self-attention of chosen blocks skipped), modality
isolation guidance (a forward without the audio-video cross attention) and the std rescale, then back to velocity.
"""

import torch

from .base import Conditioning, FlowMatchAdapter


_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")


class LTX2Adapter(FlowMatchAdapter):
    """LTX-2 (`LTX2Pipeline`): Gemma 3 prompts through the text connectors, video and audio latents denoised together,
    the pipeline's multi-term guidance; rewards get the decoded audio (`audio`, `audio_sample_rate`)."""

    pipeline_class_names = ("LTX2Pipeline",)
    is_video = True
    produces_audio = True
    default_num_frames = 121  # LTX2Pipeline's defaults: 768x512, 121 frames at 24 fps, 30 steps
    default_size = (512, 768)
    frame_rate = 24.0  # playback rate: sets the audio length and the transformer's positions
    max_sequence_length = 1024  # Gemma tokens, as LTX2Pipeline
    default_guidance_scale = 3.0  # LTX2Pipeline's video CFG scale
    # the pipeline's other guidance arguments, at its defaults; set them on the adapter to change them
    stg_scale = 1.0
    modality_scale = 3.0
    guidance_rescale = 0.7
    audio_guidance_scale = 7.0
    audio_stg_scale = 1.0
    audio_modality_scale = 3.0
    audio_guidance_rescale = 0.7
    spatio_temporal_guidance_blocks = (28,)
    use_cross_timestep = True
    # attention projections of both streams and of the audio-video cross attention, both feed-forwards
    default_lora_target_modules = [
        f"{attention}.{projection}" for attention in _ATTENTIONS for projection in ("to_q", "to_k", "to_v", "to_out.0")
    ] + ["ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2"]

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
        self.pipeline = pipeline  # the shapes below are needed by `make_sigmas` in the base constructor
        height, width = height or self.default_size[0], width or self.default_size[1]
        self.num_frames = num_frames or self.default_num_frames
        temporal, spatial = pipeline.vae_temporal_compression_ratio, pipeline.vae_spatial_compression_ratio
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            suggestion = (max(self.num_frames - 1, 0) // temporal) * temporal + 1
            raise ValueError(
                f"LTX2Pipeline needs num_frames = 1 + {temporal} * k (its VAE compresses time {temporal}x), got "
                f"{self.num_frames}; use e.g. {suggestion} or {suggestion + temporal}."
            )
        multiple = spatial * pipeline.transformer_spatial_patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"LTX2Pipeline needs height and width divisible by {multiple}, got {height}x{width}.")
        patch, patch_t = pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
        self.video_shape = (  # unpacked: (C, F', h, w)
            pipeline.transformer.config.in_channels,
            (self.num_frames - 1) // temporal + 1,
            height // spatial,
            width // spatial,
        )
        self.video_tokens = (
            (self.video_shape[1] // patch_t) * (self.video_shape[2] // patch) * (self.video_shape[3] // patch)
        )
        audio_vae = pipeline.audio_vae
        latents_per_second = (
            pipeline.audio_sampling_rate
            / pipeline.audio_hop_length
            / float(pipeline.audio_vae_temporal_compression_ratio)
        )
        self.audio_num_frames = round(self.num_frames / self.frame_rate * latents_per_second)
        self.audio_shape = (  # unpacked: (C_a, L, M')
            audio_vae.config.latent_channels,
            self.audio_num_frames,
            audio_vae.config.mel_bins // pipeline.audio_vae_mel_compression_ratio,
        )
        self.video_size = self.video_tokens * self.video_shape[0] * patch * patch * patch_t
        self.audio_size = self.audio_shape[0] * self.audio_shape[1] * self.audio_shape[2]
        self.latent_shape = (self.video_size + self.audio_size,)
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale, shift)

    def default_resolution(self) -> tuple[int, int]:
        return self.default_size

    @property
    def use_cfg(self) -> bool:
        """CFG runs when either modality's scale is above 1, as the pipeline's `do_classifier_free_guidance`."""
        return self.guidance_scale > 1 or self.audio_guidance_scale > 1

    def scheduler_sigmas(self) -> torch.Tensor:
        """As `LTX2Pipeline.__call__`: `linspace(1, 1/T, T)` shifted by `mu` for the video's token count."""
        import numpy as np
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            self.video_tokens,
            config.get("base_image_seq_len", 1024),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.95),
            config.get("max_shift", 2.05),
        )
        steps = self.num_inference_steps
        return self.scheduler_sigmas_from(np.linspace(1.0, 1 / steps, steps), mu)

    # -- the joint latent --------------------------------------------------------------------------------------------
    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat latents `(N, D_v + D_a)` as the pipeline's packed video `(N, S_v, C_v')` and audio `(N, L, C_a M')`."""
        n = latents.shape[0]
        video = latents[:, : self.video_size].reshape(n, self.video_tokens, -1)
        audio = latents[:, self.video_size :].reshape(n, self.audio_shape[1], -1)
        return video, audio

    @staticmethod
    def join(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        """Video noise then audio noise from one generator, in the pipeline's order and packing (`prepare_latents`,
        then `prepare_audio_latents`)."""
        from diffusers.utils.torch_utils import randn_tensor

        pipeline = self.pipeline
        video = randn_tensor((num_samples, *self.video_shape), generator=generator, device=device, dtype=dtype)
        video = pipeline._pack_latents(
            video, pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
        )
        audio = randn_tensor((num_samples, *self.audio_shape), generator=generator, device=device, dtype=dtype)
        return self.join(video, pipeline._pack_audio_latents(audio))

    # -- prompts -----------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Gemma's hidden states (the pipeline's `encode_prompt`) through the text connectors: the video and audio
        streams' prompt tokens and their mask, one row per prompt."""
        pipeline = self.pipeline
        max_length = min(self.max_sequence_length, pipeline.tokenizer.model_max_length)
        embeds, mask, _, _ = pipeline.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=pipeline.text_encoder.device,
        )
        padding_side = getattr(pipeline.tokenizer, "padding_side", "left")
        video, audio, connector_mask = pipeline.connectors(embeds, mask, padding_side=padding_side)
        return {"prompt_embeds": video, "audio_prompt_embeds": audio, "prompt_attention_mask": connector_mask}

    # -- the denoiser ------------------------------------------------------------------------------------------------
    def _forward(self, denoiser, video, audio, step_index, cond, **kwargs):
        """One transformer forward; its velocities for the video and the audio, in float32."""
        from diffusers.pipelines.ltx2.utils import conditioning_frame_rate

        dtype = cond["prompt_embeds"].dtype
        timestep = self.timestep(step_index, video.device)
        _, frames, height, width = self.video_shape
        video_out, audio_out = denoiser(
            hidden_states=video.to(dtype),
            audio_hidden_states=audio.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            audio_encoder_hidden_states=cond["audio_prompt_embeds"],
            timestep=self.video_timestep(timestep),
            audio_timestep=timestep,
            sigma=timestep,  # as the pipeline (read by LTX-2.3 checkpoints)
            encoder_attention_mask=cond["prompt_attention_mask"],
            audio_encoder_attention_mask=cond["prompt_attention_mask"],
            num_frames=frames // self.pipeline.transformer_temporal_patch_size,
            height=height // self.pipeline.transformer_spatial_patch_size,
            width=width // self.pipeline.transformer_spatial_patch_size,
            fps=conditioning_frame_rate(self.frame_rate, 1.0),
            audio_num_frames=self.audio_num_frames,
            use_cross_timestep=self.use_cross_timestep,
            return_dict=False,
            **kwargs,
        )
        return video_out.float(), audio_out.float()

    def video_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """The video tokens' timestep: one per sample here; per token where tokens are conditioned (`LTX2ConditionPipeline`)."""
        return timestep

    def video_x0(self, x0_video: torch.Tensor, cond) -> torch.Tensor:
        """The guided clean video the step moves towards; image conditioning replaces its conditioned tokens here."""
        return x0_video

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return self.guided_velocity(denoiser, latents, step_index, cond, None)

    def predict_guided(self, denoiser, latents, step_index, cond, negative_cond) -> torch.Tensor:
        return self.guided_velocity(denoiser, latents, step_index, cond, negative_cond)

    def guided_velocity(self, denoiser, latents, step_index, cond, negative_cond) -> torch.Tensor:
        """The velocity `LTX2Pipeline.__call__` steps with: its guidance terms in x0 space, rescaled, back to velocity.

        With `negative_cond` both CFG branches go through one forward (unconditional rows first, as the pipeline);
        spatio-temporal guidance (transformers with `perturbed_attn`) and modality-isolation guidance each add a
        forward of the conditional rows.
        """
        from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg

        video, audio = self.split(latents.float())
        sigma = self.sigmas.to(latents.device)[step_index][:, None, None]
        # The guidance forwards after the first go to the bare module: DDP takes one forward per backward, and the
        # modality-isolation forward leaves the audio-video attention unused, which DDP would mark ready too early.
        # Their gradients still reach every parameter before DDP reduces it.
        bare = getattr(denoiser, "module", denoiser)

        def to_x0(velocities):
            return video - sigma * velocities[0], audio - sigma * velocities[1]

        if negative_cond is not None:
            both = self.guidance_batch(cond, negative_cond)
            two = torch.cat([step_index, step_index])
            out = self._forward(denoiser, torch.cat([video, video]), torch.cat([audio, audio]), two, both)
            (video_uncond, video_cond), (audio_uncond, audio_cond) = (o.chunk(2) for o in out)
            x0_video, x0_audio = to_x0((video_cond, audio_cond))
            uncond_video, uncond_audio = to_x0((video_uncond, audio_uncond))
            video_delta = (self.guidance_scale - 1) * (x0_video - uncond_video)
            audio_delta = (self.audio_guidance_scale - 1) * (x0_audio - uncond_audio)
        else:
            x0_video, x0_audio = to_x0(self._forward(denoiser, video, audio, step_index, cond))
            video_delta = audio_delta = 0
        # spatio-temporal guidance perturbs only transformers built with `perturbed_attn` (LTX-2.3); for the others the
        # pipeline's extra forward equals the conditional one and its term is zero, so it is skipped
        perturbs = self.pipeline.transformer.config.get("perturbed_attn", False)
        if perturbs and (self.stg_scale > 0 or self.audio_stg_scale > 0):
            blocks = list(self.spatio_temporal_guidance_blocks or [])
            stg = self._forward(bare, video, audio, step_index, cond, spatio_temporal_guidance_blocks=blocks)
            stg_video, stg_audio = to_x0(stg)
            video_delta = video_delta + self.stg_scale * (x0_video - stg_video)
            audio_delta = audio_delta + self.audio_stg_scale * (x0_audio - stg_audio)
        if self.modality_scale > 1 or self.audio_modality_scale > 1:
            isolated = self._forward(bare, video, audio, step_index, cond, isolate_modalities=True)
            isolated_video, isolated_audio = to_x0(isolated)
            video_delta = video_delta + (self.modality_scale - 1) * (x0_video - isolated_video)
            audio_delta = audio_delta + (self.audio_modality_scale - 1) * (x0_audio - isolated_audio)
        guided_video, guided_audio = x0_video + video_delta, x0_audio + audio_delta
        if self.guidance_rescale > 0:
            guided_video = rescale_noise_cfg(guided_video, x0_video, guidance_rescale=self.guidance_rescale)
        if self.audio_guidance_rescale > 0:
            guided_audio = rescale_noise_cfg(guided_audio, x0_audio, guidance_rescale=self.audio_guidance_rescale)
        guided_video = self.video_x0(guided_video, cond)
        return self.join((video - guided_video) / sigma, (audio - guided_audio) / sigma)

    # -- decoding ----------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The video `(N, F, 3, H, W)` in [0, 1], as the pipeline decodes it (decode timestep 0, no decode noise)."""
        pipeline, vae = self.pipeline, self.pipeline.vae
        video, _ = self.split(latents)
        _, frames, height, width = self.video_shape
        patch, patch_t = pipeline.transformer_spatial_patch_size, pipeline.transformer_temporal_patch_size
        video = pipeline._unpack_latents(video, frames // patch_t, height // patch, width // patch, patch, patch_t)
        video = pipeline._denormalize_latents(video, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        timestep = None
        if vae.config.timestep_conditioning:  # the pipeline's default decode_timestep 0.0 (its noise scale 0 too)
            timestep = torch.zeros(video.shape[0], device=video.device, dtype=vae.dtype)
        pixels = vae.decode(video.to(vae.dtype), timestep, return_dict=False)[0]  # (N, 3, F, H, W)
        return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    @property
    def audio_sample_rate(self) -> int:
        return int(self.pipeline.vocoder.config.output_sampling_rate)

    def decode_audio(self, latents: torch.Tensor) -> torch.Tensor:
        """The audio track `(N, channels, samples)`, float32 clamped to [-1, 1], at `audio_sample_rate`: the audio VAE
        decodes the mel spectrogram, the vocoder makes the waveform (as the pipeline)."""
        pipeline, audio_vae = self.pipeline, self.pipeline.audio_vae
        _, audio = self.split(latents)
        audio = pipeline._denormalize_audio_latents(audio, audio_vae.latents_mean, audio_vae.latents_std)
        audio = pipeline._unpack_audio_latents(audio, self.audio_shape[1], num_mel_bins=self.audio_shape[2])
        mel = audio_vae.decode(audio.to(audio_vae.dtype), return_dict=False)[0]
        return pipeline.vocoder(mel.to(pipeline.vocoder.dtype)).float().clamp(-1, 1)

    def decode_extras(self, latents: torch.Tensor) -> dict:
        return {"audio": self.decode_audio(latents), "audio_sample_rate": self.audio_sample_rate}

    def pipeline_guidance_arguments(self) -> dict:
        names = ("stg_scale", "modality_scale", "guidance_rescale", "audio_guidance_scale", "audio_stg_scale")
        names += ("audio_modality_scale", "audio_guidance_rescale")
        arguments = {"guidance_scale": float(self.guidance_scale)}
        arguments.update({name: float(getattr(self, name)) for name in names})
        arguments["frame_rate"] = float(self.frame_rate)
        return arguments
