"""FLUX.1 (`FluxPipeline`): rectified flow, packed 2x2 latents, embedded guidance, T5 + CLIP prompts."""

import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, FlowMatchAdapter


class FluxAdapter(FlowMatchAdapter):
    pipeline_class_names = ("FluxPipeline",)
    denoiser_name = "transformer"
    default_guidance_scale = 3.5  # FLUX.1-dev's embedded guidance, as in DanceGRPO's recipe
    default_lora_target_modules = [
        *JOINT_ATTENTION_LORA_TARGETS,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
        "proj_out",
    ]

    @property
    def embedded_guidance(self) -> bool:  # FLUX.1-schnell has no guidance embedding: it gets CFG if asked for
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        vae_scale = pipeline.vae_scale_factor
        # packing 2x2 latent patches needs latent sides divisible by 2
        if self.height % (vae_scale * 2) or self.width % (vae_scale * 2):
            raise ValueError(
                f"FLUX needs height and width divisible by {vae_scale * 2}, got {self.height}x{self.width}."
            )
        latent_h, latent_w = self.height // vae_scale, self.width // vae_scale
        channels = pipeline.transformer.config.in_channels // 4
        self.latent_shape = (channels, latent_h, latent_w)
        self._image_ids = pipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, "cpu", torch.float32)

    def scheduler_sigmas(self) -> torch.Tensor:
        # exactly what FluxPipeline.__call__ does: its sigma grid, shifted by `mu` for this image size
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler, steps = self.pipeline.scheduler, self.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        latent_h, latent_w = (
            self.height // self.pipeline.vae_scale_factor,
            self.width // self.pipeline.vae_scale_factor,
        )
        mu = calculate_shift(
            (latent_h // 2) * (latent_w // 2),
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

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # FLUX.1 was trained with 512 T5 tokens; small tokenizers (the tiny test models) cap it lower
        max_length = min(512, self.pipeline.tokenizer_2.model_max_length)
        device = self.pipeline.text_encoder_2.device
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        noise = super().initial_noise(num_samples, generator, device, dtype)
        return self.pipeline._pack_latents(noise, num_samples, *self.latent_shape)

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        sigma = self.sigmas.to(latents.device)[step_index]
        guidance = None
        if self.embedded_guidance:
            guidance = torch.full((latents.shape[0],), self.guidance_scale, device=latents.device, dtype=torch.float32)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        return denoiser(
            hidden_states=latents,
            timestep=sigma.to(latents.dtype),  # FLUX takes t / 1000 = sigma
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=self._image_ids.to(device=latents.device, dtype=latents.dtype),
            return_dict=False,
        )[0]

    def decode(self, latents) -> torch.Tensor:
        latents = self.pipeline._unpack_latents(latents, self.height, self.width, self.pipeline.vae_scale_factor)
        return self._decode_vae(latents)
