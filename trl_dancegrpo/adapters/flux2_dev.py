"""FLUX.2 [dev] (`Flux2Pipeline`): klein's transformer, latents, schedule and decoding, prompts encoded by Mistral
Small 3 (three hidden layers side by side, behind the pipeline's system message) and guidance embedded in the model
(guidance-distilled: no CFG)."""

import torch

from .flux2 import Flux2KleinAdapter


class Flux2Adapter(Flux2KleinAdapter):
    """FLUX.2 [dev] text-to-image (its reference-image editing is not used)."""

    pipeline_class_names = ("Flux2Pipeline",)
    embedded_guidance = True  # Flux2Pipeline feeds `guidance_scale` to the transformer's guidance embedder
    default_guidance_scale = 4.0  # Flux2Pipeline's default (and the model card's)
    text_encoder_out_layers = (10, 20, 30)  # the pipeline's default

    def __init__(self, pipeline, *args, **kwargs):
        if not pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                "This Flux2Pipeline's transformer has no guidance embedder (`guidance_embeds` is false): FLUX.2 [dev] "
                "samples with embedded guidance; load a FLUX.2 [dev] checkpoint."
            )
        super().__init__(pipeline, *args, **kwargs)

    def text_tokenizer(self):
        return self.pipeline.tokenizer.tokenizer  # the PixtralProcessor's tokenizer

    def guidance_input(self, latents: torch.Tensor) -> torch.Tensor:
        # as Flux2Pipeline: the scale itself, in float32, one per sample
        return torch.full((latents.shape[0],), self.guidance_scale, device=latents.device, dtype=torch.float32)
