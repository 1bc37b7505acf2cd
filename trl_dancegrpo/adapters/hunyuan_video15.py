"""HunyuanVideo 1.5 text-to-video (`HunyuanVideo15Pipeline`) and image-to-video (`HunyuanVideo15ImageToVideoPipeline`):
one transformer, Qwen2.5-VL + ByT5 (glyph) prompts, SigLIP image tokens, the conditioning latents and a mask
concatenated to the latents on the channels, classifier-free guidance through the pipeline's `guider`.

diffusers has no LoRA loader mixin for these pipelines: the LoRA is saved in the layout that
`pipe.transformer.load_lora_adapter(folder)` reads (keys and metadata under `transformer.`, the file name of the
mixins), which is also what a future `pipe.load_lora_weights` would read.
"""

import torch

from .base import JOINT_ATTENTION_LORA_TARGETS, Conditioning
from .hunyuan_video import HunyuanVideoAdapter
from .video_base import VideoAdapter


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the LoRA loader mixins' file name


class HunyuanVideo15Adapter(VideoAdapter):
    """HunyuanVideo 1.5 text-to-video: true CFG with the empty negative prompt, at the pipeline guider's scale."""

    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    default_num_frames = 121  # the pipelines' default
    default_lora_target_modules = list(JOINT_ATTENTION_LORA_TARGETS)
    lora_load_method = "transformer.load_lora_adapter"  # no pipeline mixin: the card loads into the transformer

    # the same grid as HunyuanVideo: linspace(1, 0) handed to the scheduler, which applies its shift; the same VAE scaling
    scheduler_sigmas = HunyuanVideoAdapter.scheduler_sigmas
    latents_to_vae = HunyuanVideoAdapter.latents_to_vae

    def __init__(self, pipeline, num_inference_steps, height=None, width=None, guidance_scale=None, **kwargs):
        guider = pipeline.guider
        defaults = {"guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0, "stop": 1.0}
        changed = {k: guider.config[k] for k, v in defaults.items() if guider.config.get(k, v) != v}
        if type(guider).__name__ != "ClassifierFreeGuidance" or changed:
            raise ValueError(
                f"{type(pipeline).__name__}'s guider is {type(guider).__name__} with {changed or 'its settings'}; only "
                "plain classifier-free guidance is supported. Give the pipeline "
                "`ClassifierFreeGuidance(guidance_scale=...)` as its guider."
            )
        if guidance_scale is None:  # the checkpoint's own CFG scale (6 in the published ones; 1 when distilled)
            guidance_scale = guider.guidance_scale if guider.config.get("enabled", True) else 1.0
        super().__init__(pipeline, num_inference_steps, height, width, guidance_scale, **kwargs)
        # The prompt goes into the system message the model was trained with; the template's tokens are cropped from
        # the hidden states. diffusers hard-codes the crop (108, the count of Qwen2.5-VL's tokenizer); the official
        # code counts the tokens up to the user's turn, as here, so that any tokenizer (the tiny test one) crops exactly
        # the template.
        tokenizer = pipeline.tokenizer
        conversation = [{"role": "system", "content": pipeline.system_message}, {"role": "user", "content": "{}"}]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        self.crop_start = len(tokenizer(text.split("{}")[0])["input_ids"])
        # small tokenizers (the tiny test models) cap the prompt lengths lower than the pipeline's 1000 and 256
        self.max_length = min(pipeline.tokenizer_max_length, tokenizer.model_max_length)
        self.max_length_2 = min(pipeline.tokenizer_2_max_length, pipeline.tokenizer_2.model_max_length)

    def default_resolution(self) -> tuple[int, int]:
        # the pipeline's default: the 16:9 bucket of the transformer's target size (480p: 480x848)
        width, height = getattr(self.pipeline, "default_aspect_ratio", (16, 9))  # image-to-video: the same default
        return self.pipeline.video_processor.calculate_default_height_width(height, width, self.pipeline.target_size)

    @property
    def latent_channels(self) -> int:
        return self.pipeline.vae.config.latent_channels

    @property
    def spatial_patch_size(self) -> int:
        return self.pipeline.transformer.config.patch_size

    def pipeline_guidance_arguments(self) -> dict:
        return {}  # the pipeline's call takes no guidance argument: the card sets `pipe.guider` (`pipeline_setup`)

    def pipeline_setup(self) -> list[str]:
        return [f"pipe.guider = pipe.guider.new(guidance_scale={self.guidance_scale:g})"]

    def unused_parameter_prefixes(self) -> list[str]:
        # the transformer returns the video tokens only: the last block's text stream (its queries, attention output
        # and MLP) reaches nothing; text-to-video gives zero image tokens, which the transformer masks out, so nothing
        # reaches the image projection either
        last = f"transformer_blocks.{self.pipeline.transformer.config.num_layers - 1}"
        prefixes = [f"{last}.attn.add_q_proj", f"{last}.attn.norm_added_q", f"{last}.attn.to_add_out"]
        return prefixes + [f"{last}.ff_context"] + ([] if self.requires_image else ["image_embedder"])

    def lora_load_arguments(self, folder: str | None = None, named: bool = False) -> list[str]:
        # `load_lora_adapter` looks for a pickled file unless told the name (the mixins' `load_lora_weights` does not)
        return [f', weight_name="{folder + "/" if folder else ""}{LORA_WEIGHTS}"']

    def load_lora(self, folder: str) -> None:
        self.denoiser.load_lora_adapter(folder, weight_name=LORA_WEIGHTS)

    def unload_lora(self) -> None:
        self.denoiser.unload_lora()

    def save_lora_weights(self, save_directory: str, lora_state_dict: dict, lora_metadata: dict | None) -> None:
        from diffusers.loaders.lora_base import LoraBaseMixin

        prefix = self.denoiser_name
        metadata = {f"{prefix}.{k}": v for k, v in lora_metadata.items()} if lora_metadata else None
        LoraBaseMixin.write_lora_layers(
            state_dict=LoraBaseMixin.pack_weights(lora_state_dict, prefix),
            save_directory=save_directory,
            is_main_process=True,
            weight_name=LORA_WEIGHTS,
            save_function=None,
            safe_serialization=True,
            lora_adapter_metadata=metadata,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # one video at a time: the VAE's mid-block attention builds its causal mask for a batch of one (diffusers
        # 0.42.1 broadcasts a (N, S, S) mask against (N, 1, S, S) queries, which fails for N > 1)
        return torch.cat([super(HunyuanVideo15Adapter, self).decode(latents[i : i + 1]) for i in range(len(latents))])

    # -- conditioning ------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pipeline = self.pipeline
        device = pipeline.text_encoder.device
        embeds, mask = pipeline._get_mllm_prompt_embeds(
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            prompt=prompts,
            device=device,
            tokenizer_max_length=self.max_length,
            system_message=pipeline.system_message,
            crop_start=self.crop_start,
        )
        embeds_2, mask_2 = pipeline._get_byt5_prompt_embeds(
            tokenizer=pipeline.tokenizer_2,
            text_encoder=pipeline.text_encoder_2,
            prompt=prompts,
            device=device,
            tokenizer_max_length=self.max_length_2,
        )
        return {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": mask,
            "prompt_embeds_2": embeds_2,
            "prompt_embeds_mask_2": mask_2,
        }

    def image_tokens(self, cond: Conditioning, latents: torch.Tensor) -> torch.Tensor:
        """The SigLIP tokens of the conditioning image; text-to-video: zeros, which the transformer masks out."""
        transformer = self.pipeline.transformer
        shape = (latents.shape[0], self.pipeline.vision_num_semantic_tokens, transformer.config.image_embed_dim)
        # one stored zero, broadcast (the transformer tests the values to choose text-to-video: the estimate keeps it real)
        return torch.zeros((), device=latents.device, dtype=transformer.dtype).expand(shape)

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The latents, the conditioning latents and their mask on the channels (text-to-video: zeros)."""
        zeros = latents.new_zeros(latents.shape[0], latents.shape[1] + 1, *latents.shape[2:])
        return torch.cat([latents, zeros], dim=1)

    def extra_inputs(self, step_index: torch.Tensor, device) -> dict:
        return {}

    def predict(self, denoiser, latents, step_index, cond) -> torch.Tensor:
        return denoiser(
            hidden_states=self.model_input(latents, cond),
            image_embeds=self.image_tokens(cond, latents),
            timestep=self.timestep(step_index, latents.device),  # t = sigma * 1000, as the pipeline's scheduler
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_embeds_mask"],
            encoder_hidden_states_2=cond["prompt_embeds_2"],
            encoder_attention_mask_2=cond["prompt_embeds_mask_2"],
            **self.extra_inputs(step_index, latents.device),
            return_dict=False,
        )[0]


class HunyuanVideo15ImageToVideoAdapter(HunyuanVideo15Adapter):
    """HunyuanVideo 1.5 image-to-video: the image's latents in the first latent frame (a mask marks it) and its SigLIP
    tokens beside the prompt's, the same in both CFG branches.

    The pipeline picks its size from the image (the bucket of the image's aspect ratio) and crops the image to it; here
    every image is cropped to the training size the same way, so the pipeline samples as training did for images of
    that aspect ratio.
    """

    pipeline_class_names = ("HunyuanVideo15ImageToVideoPipeline",)
    requires_image = True
    value_branch_keys = ("image_embeds",)  # the transformer takes all-zero image tokens for text-to-video

    def pipeline_size_arguments(self) -> dict:
        return {}  # the pipeline's call takes no height or width: the image's aspect ratio picks them

    def encode_images(self, images: list) -> Conditioning:
        pipeline = self.pipeline
        vae, device = pipeline.vae, pipeline.vae.device
        cropped = [
            pipeline.video_processor.resize(image, height=self.height, width=self.width, resize_mode="crop")
            for image in images
        ]
        # the VAE latents and SigLIP's tokens of the cropped image, as the pipeline computes them
        latents = []
        for image in cropped:  # one at a time: the VAE's attention takes a batch of one (see `decode`)
            # the pipeline's `_get_image_latents`: its preprocessing, the distribution's mode (`sample_mode="argmax"`)
            pixels = self.preprocess_images([image]).to(device, vae.dtype).unsqueeze(2)
            latents.append(vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor)
        tokens = torch.cat(
            [
                pipeline._get_image_embeds(pipeline.image_encoder, pipeline.feature_extractor, image, device)
                for image in cropped
            ]
        )
        return {"image_latents": torch.cat(latents).float(), "image_embeds": tokens.float()}

    def image_tokens(self, cond: Conditioning, latents: torch.Tensor) -> torch.Tensor:
        return cond["image_embeds"].to(self.pipeline.transformer.dtype)

    def model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        image = cond["image_latents"].to(latents.dtype)  # (N, C, 1, h, w): the first latent frame
        later = latents.shape[2] - 1
        condition = torch.cat([image, image.new_zeros(*image.shape[:2], later, *image.shape[3:])], dim=2)
        mask = latents.new_zeros(latents.shape[0], 1, *latents.shape[2:])
        mask[:, :, 0] = 1.0
        return torch.cat([latents, condition, mask], dim=1)

    def extra_inputs(self, step_index: torch.Tensor, device) -> dict:
        # the step-distilled (MeanFlow) checkpoints also take the step's end: the next timestep, 0 at the last step
        if not self.pipeline.transformer.config.use_meanflow:
            return {}
        num_train_timesteps = self.pipeline.scheduler.config.get("num_train_timesteps", 1000)
        return {"timestep_r": self.sigmas.to(device)[step_index + 1] * num_train_timesteps}
