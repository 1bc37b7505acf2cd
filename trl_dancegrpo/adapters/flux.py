"""FLUX.1 (`FluxPipeline`): rectified flow, packed 2x2 latents, embedded guidance, T5 + CLIP prompts."""

import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning
from .image_base import PackedLatentAdapter


class FluxAdapter(PackedLatentAdapter):
    pipeline_class_names = ("FluxPipeline",)
    denoiser_name = "transformer"
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

    @property
    def default_guidance_scale(self) -> float:
        # FLUX.1-dev's embedded guidance 3.5, as in DanceGRPO's recipe; without a guidance embedding (FLUX.1-schnell)
        # the pipeline's default, `true_cfg_scale=1`: no CFG unless asked for
        return 3.5 if self.embedded_guidance else 1.0

    def pipeline_guidance_arguments(self) -> dict:
        if self.embedded_guidance:
            return super().pipeline_guidance_arguments()
        # without a guidance embedding FluxPipeline ignores `guidance_scale`: its true CFG takes `true_cfg_scale` and a
        # negative prompt, combined as ours (uncond + scale * (cond - uncond), the empty prompt as the negative)
        if self.use_cfg:
            return {"true_cfg_scale": float(self.guidance_scale), "negative_prompt": ""}
        return {"true_cfg_scale": 1.0}

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        # the RoPE positions of the tokens in `model_input` (editing appends the source image's)
        self.token_ids = pipeline._prepare_latent_image_ids(1, *self.token_grid, "cpu", torch.float32)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # FLUX.1 was trained with 512 T5 tokens; small tokenizers (the tiny test models) cap it lower
        max_length = min(512, self.pipeline.tokenizer_2.model_max_length)
        device = self.pipeline.text_encoder_2.device
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        sigma = self.sigmas.to(latents.device)[step_index]
        guidance = None
        if self.embedded_guidance:
            guidance = torch.full((latents.shape[0],), self.guidance_scale, device=latents.device, dtype=torch.float32)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        output = denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=sigma.to(latents.dtype),  # FLUX takes t / 1000 = sigma
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=text_ids,
            img_ids=self.token_ids.to(device=latents.device, dtype=latents.dtype),
            return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]  # the noisy tokens' prediction

    def decode(self, latents) -> torch.Tensor:
        return self._decode_vae(self.unpack(latents))
