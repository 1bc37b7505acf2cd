"""FLUX.2 [klein] (`Flux2KleinPipeline`): rectified flow on 2x2-patchified, batch-normalised latents packed into
tokens with 4-D position ids, a Qwen3 text encoder (three hidden layers side by side), CFG for the base models and none
for the step-distilled ones."""

import numpy as np
import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, FlowMatchAdapter


class Flux2KleinAdapter(FlowMatchAdapter):
    """FLUX.2 [klein] text-to-image (its reference-image editing is not used)."""

    pipeline_class_names = ("Flux2KleinPipeline",)
    default_eta = 0.3  # DanceGRPO's FLUX recipe (no public recipe of its own)
    max_sequence_length = 512  # Qwen3 tokens, as Flux2KleinPipeline
    text_encoder_out_layers = (9, 18, 27)  # the pipeline's default
    # both streams' attention and feed-forward projections, and the single blocks' fused QKV + MLP input projection
    # (their output projection shares its name, `attn.to_out`, with the double blocks' list of modules: left out)
    default_lora_target_modules = [
        *JOINT_ATTENTION_LORA_TARGETS,
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    ]

    @property
    def default_guidance_scale(self) -> float:
        # the base models' pipeline default is CFG 4; the step-distilled ones take no guidance
        return 1.0 if self.pipeline.config.get("is_distilled", False) else 4.0

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        if pipeline.config.get("is_distilled", False) and self.guidance_scale > 1:
            raise ValueError(
                f"This FLUX.2 [klein] is step-distilled: its pipeline ignores guidance_scale, so training with CFG "
                f"({self.guidance_scale}) would learn another sampler than the one you use; leave guidance_scale unset "
                "(1) or train a base (non-distilled) klein."
            )
        multiple = pipeline.vae_scale_factor * 2  # VAE downsampling, then 2x2 patches
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"FLUX.2 needs height and width divisible by {multiple}, got {self.height}x{self.width}.")
        self.latent_shape = (pipeline.transformer.config.in_channels, self.height // multiple, self.width // multiple)
        self._latent_ids = pipeline._prepare_latent_ids(torch.zeros(1, *self.latent_shape))  # (1, h * w, 4)

    def scheduler_sigmas(self) -> torch.Tensor:
        # as Flux2KleinPipeline.__call__: its grid, shifted by the empirical `mu` of this size and step count
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        steps = self.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        patch = self.pipeline.vae_scale_factor * 2
        num_tokens = (self.height // patch) * (self.width // patch)
        return self.scheduler_sigmas_from(sigmas, compute_empirical_mu(num_tokens, steps))

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipeline = self.pipeline
        prompt_embeds, text_ids = pipeline.encode_prompt(
            prompt=list(prompts),
            device=pipeline.text_encoder.device,
            max_sequence_length=min(self.max_sequence_length, self.text_tokenizer().model_max_length),
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"prompt_embeds": prompt_embeds, "text_ids": text_ids}

    def text_tokenizer(self):
        """The tokenizer of the prompts (its `model_max_length` caps theirs: the tiny test models' is small)."""
        return self.pipeline.tokenizer

    def guidance_input(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The transformer's `guidance` argument: none for klein (CFG or no guidance)."""
        return None

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        return self.pipeline._pack_latents(super().initial_noise(num_samples, generator, device, dtype))

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        sigma = self.sigmas.to(latents.device)[step_index]
        image_ids = self._latent_ids.to(latents.device).expand(latents.shape[0], -1, -1)
        return denoiser(
            hidden_states=latents,
            timestep=sigma.to(latents.dtype),  # FLUX.2 takes t / 1000 = sigma
            guidance=self.guidance_input(latents),
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def decode(self, latents) -> torch.Tensor:
        pipeline, vae = self.pipeline, self.pipeline.vae
        ids = self._latent_ids.to(latents.device).expand(latents.shape[0], -1, -1)
        latents = pipeline._unpack_latents_with_ids(latents, ids).to(vae.dtype)  # FLUX.2 [dev]'s takes no sizes
        # undo the batch normalisation of the patchified latents, then the 2x2 patches, as the pipeline does
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        latents = pipeline._unpatchify_latents(latents * std + mean)
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
