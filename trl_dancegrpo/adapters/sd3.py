"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): rectified flow, unpacked latents, CLIP x2 + T5 prompts,
classifier-free guidance."""

import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning, FlowMatchAdapter


class StableDiffusion3Adapter(FlowMatchAdapter):
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    default_guidance_scale = 4.5  # flow-GRPO's SD3.5 recipe trains with CFG 4.5
    max_sequence_length = 256  # T5 tokens, as StableDiffusion3Pipeline
    # flow-GRPO's SD3 LoRA targets: the attention projections of both streams
    default_lora_target_modules = list(JOINT_ATTENTION_LORA_TARGETS)

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        multiple = pipeline.vae_scale_factor * pipeline.transformer.config.patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"SD3 needs height and width divisible by {multiple}, got {self.height}x{self.width}.")
        scale = pipeline.vae_scale_factor
        self.latent_shape = (pipeline.transformer.config.in_channels, self.height // scale, self.width // scale)

    def unused_parameter_prefixes(self) -> list[str]:
        # the last joint block only updates the image stream: its context queries reach nothing
        blocks = self.pipeline.transformer.transformer_blocks
        return [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(blocks) if block.context_pre_only]

    def scheduler_sigmas(self) -> torch.Tensor:
        # as StableDiffusion3Pipeline.__call__, including the resolution-dependent shift of SD3.5-style schedulers
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler, config = self.pipeline.scheduler, self.pipeline.scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            patch = self.pipeline.vae_scale_factor * self.pipeline.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (self.height // patch) * (self.width // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(self.num_inference_steps, **kwargs)
        return scheduler.sigmas.double().cpu()

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        max_length = self.max_sequence_length
        if self.pipeline.tokenizer_3 is not None:  # small tokenizers (the tiny test models) cap it lower
            max_length = min(max_length, self.pipeline.tokenizer_3.model_max_length)
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.pipeline.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return denoiser(
            hidden_states=latents,
            timestep=self.timestep(step_index, latents.device),  # SD3 takes t = sigma * 1000
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def decode(self, latents) -> torch.Tensor:
        return self._decode_vae(latents)
