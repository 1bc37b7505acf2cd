"""Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`): UNet epsilon/v prediction, DDIM SDE, CLIP prompts, CFG."""

import torch

from .base import Conditioning, DDIMAdapter


class StableDiffusionAdapter(DDIMAdapter):
    pipeline_class_names = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    default_guidance_scale = 5.0  # the public DanceGRPO SD 1.4 recipe trains with CFG 5
    default_lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

    def default_resolution(self) -> tuple[int, int]:
        size = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return size, size

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        device = self.pipeline.text_encoder.device
        prompt_embeds, _ = self.pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": prompt_embeds}

    def initial_noise(self, num_samples, generator, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        scale = self.pipeline.vae_scale_factor
        shape = (num_samples, self.pipeline.unet.config.in_channels, self.height // scale, self.width // scale)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        timestep = self.timesteps.to(latents.device)[step_index]
        return denoiser(latents, timestep, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]

    def decode(self, latents) -> torch.Tensor:
        return self._decode_vae(latents)

    def save_lora_weights(self, save_directory, lora_state_dict, lora_metadata) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        # as diffusers' train_dreambooth_lora.py does for UNets
        super().save_lora_weights(save_directory, convert_state_dict_to_diffusers(lora_state_dict), lora_metadata)
