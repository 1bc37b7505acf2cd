"""Z-Image (`ZImagePipeline`): rectified flow, unpacked latents, a Qwen3 text encoder whose prompt embeddings keep only
the prompt's tokens, and a denoiser that takes lists (one tensor per image), the timestep 1 - sigma, and predicts the
negative velocity."""

import torch

from .base import Conditioning, FlowMatchAdapter


class ZImageAdapter(FlowMatchAdapter):
    """Z-Image text-to-image. `guidance_scale` is the usual CFG scale (1 = off, Z-Image-Turbo's setting); the
    pipeline's own `guidance_scale` counts from 0 (`cond + g * (cond - uncond)`), so it is ours minus 1."""

    pipeline_class_names = ("ZImagePipeline",)
    default_eta = 0.3  # DanceGRPO's FLUX recipe (no public recipe of its own)
    default_guidance_scale = 1.0  # Z-Image-Turbo samples without CFG (its pipeline's guidance_scale=0)
    max_sequence_length = 512  # Qwen3 tokens, as ZImagePipeline
    # the attention and SwiGLU feed-forward projections of every block (the main layers and both refiners)
    default_lora_target_modules = [
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        multiple = pipeline.vae_scale_factor * 2  # VAE downsampling, then 2x2 patches
        if self.height % multiple or self.width % multiple:
            raise ValueError(
                f"Z-Image needs height and width divisible by {multiple}, got {self.height}x{self.width}."
            )
        scale = pipeline.vae_scale_factor
        self.latent_shape = (pipeline.transformer.config.in_channels, self.height // scale, self.width // scale)

    def default_resolution(self) -> tuple[int, int]:
        return 1024, 1024  # ZImagePipeline's default

    def pipeline_guidance_scale(self) -> float:
        return self.guidance_scale - 1

    def scheduler_sigmas(self) -> torch.Tensor:
        # as ZImagePipeline.__call__: its default grid, shifted by `mu` for this image size
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = self.pipeline.scheduler.config
        patch = self.pipeline.vae_scale_factor * 2
        mu = calculate_shift(
            (self.height // patch) * (self.width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return self.scheduler_sigmas_from(get_default_z_image_sigmas(self.num_inference_steps), mu)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipeline = self.pipeline
        max_length = min(self.max_sequence_length, pipeline.tokenizer.model_max_length)
        embeds, _ = pipeline.encode_prompt(
            prompt=list(prompts),  # the pipeline rewrites the list in place (chat template)
            device=pipeline.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        # one tensor per prompt, its tokens only: padded to a batch with a mask, so rows can be indexed and batched
        padded = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), max_length, dtype=torch.bool, device=padded.device)
        for i, embed in enumerate(embeds):
            padded[i, : len(embed)] = embed
            mask[i, : len(embed)] = True
        return {"prompt_embeds": padded, "prompt_mask": mask}

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        dtype = cond["prompt_embeds"].dtype
        sigma = self.sigmas.to(latents.device)[step_index]
        captions = [embed[mask] for embed, mask in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        output = denoiser(
            list(latents.to(dtype).unsqueeze(2).unbind(0)),  # (C, 1, h, w) per image: one frame
            (1 - sigma).to(dtype),  # Z-Image takes (1000 - t) / 1000
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(output).squeeze(2)  # it predicts the negative of the velocity

    def decode(self, latents) -> torch.Tensor:
        return self._decode_vae(latents)
