"""Qwen-Image 2.1 text-to-image (`QwenImage21Pipeline`): a Qwen3-VL prompt encoder, one single-stream block-causal
transformer over the prompt's tokens followed by the image's, unpatched 64-channel latents (16x VAE) normalised per
channel, an RGBA VAE, and plain true classifier-free guidance (no norm rescale)."""

import logging

import torch

from .base import Conditioning, PipelineAdapter
from .qwen_image import QwenImageAdapter, pad_tokens


logger = logging.getLogger(__name__)


class QwenImage21Adapter(QwenImageAdapter):
    """Qwen-Image 2.1. Prompts go through the pipeline's own `encode_prompt` one at a time (its chat template; the
    system turn's tokens are dropped); rows are zero-padded to a common length with their mask.

    The transformer puts the image's tokens after the prompt's in one sequence whose rotary positions count every
    prompt position, padding included, and reads one layout for the whole batch (`img_mask`'s first row). So a padded
    row would not be the model the pipeline samples: `predict` runs the rows grouped by prompt length, each group
    unpadded, which is exactly the pipeline called on one prompt (and makes a row's prediction independent of the
    other rows of its batch: the rollout's and the loss's batches need not match).

    Without guidance by default (`true_cfg_scale=1`, the pipeline's default: the model is meant to be sampled without
    it). `guidance_scale > 1` trains with the pipeline's true CFG, `uncond + scale * (cond - uncond)` with the
    negative prompt `" "`, each branch its own transformer call, as `__call__` does.

    The sigma grid is the pipeline's: its configured `sample_sigmas` when their length is `num_inference_steps`, else
    `linspace(1, 1/T, T)` (what `__call__` uses without them), shifted by the scheduler for the image's token count.
    Text-to-image only: the pipeline's condition images (`image=`) are not used. The pipeline does not use the KV
    cache here (it is an inference shortcut; training needs the whole forward), which matches `use_kv_cache=False`.
    """

    pipeline_class_names = ("QwenImage21Pipeline",)
    default_guidance_scale = 1.0  # QwenImage21Pipeline's `true_cfg_scale` default
    max_sequence_length = None  # the pipeline keeps every prompt token (no limit)
    # the single-stream block's projections (attention and SwiGLU MLP), as the transformer's tensor-parallel plan
    default_lora_target_modules = [
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "img_mlp.proj",
        "img_mlp.gate_layer",
        "img_mlp.out",
    ]

    def default_resolution(self) -> tuple[int, int]:
        return 1024, 1024  # the pipeline's `output_resolution` default, its height and width without an image

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels  # latents are not patched: one token per latent pixel

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.latent_shape[1], self.latent_shape[2]

    def unused_parameter_prefixes(self) -> list[str]:
        return []  # single-stream: every block's parameters reach the image tokens

    def scheduler_sigmas(self) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

        steps = self.num_inference_steps
        configured = self.pipeline.config.get("sample_sigmas")
        if configured is not None and len(configured) == steps:
            sigmas = list(configured)
        else:
            if configured is not None:
                logger.warning(
                    "The pipeline's sample_sigmas have %d steps, not num_inference_steps=%d: sampling on "
                    "linspace(1, 1/%d, %d), as QwenImage21Pipeline does without sample_sigmas.",
                    len(configured),
                    steps,
                    steps,
                    steps,
                )
            sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler = self.pipeline.scheduler
        mu = calculate_shift(
            # the pipeline's `latents.shape[1]`: one token per latent pixel (`latent_shape` is set after the sigmas)
            (self.height // self.pipeline.vae_scale_factor) * (self.width // self.pipeline.vae_scale_factor),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler.sigmas.double().cpu()

    # -- prompts -----------------------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], images: list | None = None) -> Conditioning:
        pipeline = self.pipeline
        rows = []
        for prompt in prompts:
            embeds, _, image_pad_mask = pipeline.encode_prompt(prompt=[prompt], device=pipeline.text_encoder.device)
            if image_pad_mask.any():
                raise ValueError("QwenImage21Adapter encodes text prompts only.")  # no condition image is passed
            rows.append(embeds)
        length = max(row.shape[1] for row in rows)
        masks = [torch.ones(row.shape[:2], dtype=torch.long, device=row.device) for row in rows]
        return {
            "prompt_embeds": torch.cat([pad_tokens(row, length) for row in rows]),
            "prompt_embeds_mask": torch.cat([pad_tokens(mask, length) for mask in masks]),
        }

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # QwenImage21Pipeline's true CFG is plain: `neg + scale * (cond - neg)`, no norm rescale (unlike Qwen-Image)
        return PipelineAdapter.combine_guidance(self, uncond, cond)

    # -- the transformer ---------------------------------------------------------------------------------------------
    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        sigma = self.sigmas.to(latents.device)[step_index].to(latents.dtype)
        sigma = sigma.expand(latents.shape[0]) if sigma.dim() == 0 else sigma
        lengths = cond["prompt_embeds_mask"].sum(dim=1)
        output = torch.empty_like(latents)
        image_slots = latents.shape[1] // 4  # one slot of the encoder's sequence per 2x2 latent tokens
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero(as_tuple=True)[0]
            embeds = cond["prompt_embeds"][rows, :length]
            img_mask = torch.cat(
                [
                    torch.zeros(len(rows), length, dtype=torch.bool, device=latents.device),
                    torch.ones(len(rows), image_slots, dtype=torch.bool, device=latents.device),
                ],
                dim=1,
            )
            prediction = denoiser(
                hidden_states=latents[rows],
                timestep=sigma[rows],  # the pipeline passes t / 1000 = sigma
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=None,  # unpadded, as the pipeline's single prompt (its mask is dropped)
                img_shapes=[[(1, *self.token_grid)]] * len(rows),
                img_mask=img_mask,
                return_dict=False,
            )[0]
            output[rows] = prediction[:, -latents.shape[1] :].to(output.dtype)  # the image's tokens come last
        return output

    # -- latents -----------------------------------------------------------------------------------------------------
    def decode(self, latents) -> torch.Tensor:
        """The pipeline's decoding (`(N, 4, H, W)` RGBA from the Qwen-Image 2.1 VAE), as RGB for the rewards: the alpha
        composited over white, as the pipeline shows RGBA images to its own vision encoder."""
        vae = self.pipeline.vae
        latents = self.unpack(latents).to(vae.dtype)
        mean, std = self._latent_statistics(latents)
        images = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return composite_over_white(images)


def composite_over_white(images: torch.Tensor) -> torch.Tensor:
    """`(N, 4, H, W)` RGBA in [0, 1] to `(N, 3, H, W)` RGB over a white background; RGB is returned as is."""
    if images.shape[1] == 3:
        return images
    rgb, alpha = images[:, :3], images[:, 3:4]
    return rgb * alpha + (1 - alpha)
