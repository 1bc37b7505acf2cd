"""Prompt encoding for the rollout: each distinct row encoded once, an optional cache, encoders offloaded to CPU."""

import torch

from .models import ENCODER_COMPONENTS, on_device_while_used
from .rollout import index_conditioning


class PromptEncoder:
    """Encodes the conditioning of a batch of samples with the adapter's encoders.

    Args:
        adapter ([`~trl_dancegrpo.adapters.PipelineAdapter`]): The model's adapter (its `encode_conditioning`).
        device (`torch.device`): Where the conditioning is returned.
        cache (`bool`): Keep each row's conditioning on the CPU and encode a row only the first time
            (`cache_prompt_embeddings`).
        offload_encoders (`bool`): The text and image encoders wait on the CPU and visit `device` only to encode
            (`offload_text_encoders`).
    """

    def __init__(self, adapter, device, cache: bool = False, offload_encoders: bool = False):
        self.adapter, self.device = adapter, device
        self.use_cache, self.offload_encoders = cache, offload_encoders
        self.cache = {}  # row key -> its conditioning on the CPU, with `cache`
        self.negative = None  # the negative (unconditional) conditioning, encoded once, with CFG

    def encoders_on_device(self):
        """With `offload_encoders`, the text and image encoders are on the device only inside this context."""
        modules = self.adapter.frozen_modules().items() if self.offload_encoders else ()
        encoders = [module.to for name, module in modules if name.startswith(ENCODER_COMPONENTS)]
        return on_device_while_used(encoders, self.device)

    def __call__(self, prompts: list[str], images: list | None = None):
        """Conditioning of each sample, encoded once per distinct row and indexed per sample, and the negative one
        (None without CFG).

        A row is its prompt, and for image-to-video and editing also its conditioning image (video-to-video: its
        source video; compared by content: the samples of a group arrive as separately decoded copies). `images` is ignored by text-conditioned models.
        """
        if self.adapter.requires_image:
            if images is None or len(images) != len(prompts):
                raise ValueError(
                    f"{type(self.adapter.pipeline).__name__} is {self.adapter.task}: it needs one conditioning image "
                    "per prompt "
                    f"(got {'none' if images is None else len(images)} for {len(prompts)} prompts)."
                )
            images = [
                self.adapter.load_conditioning(image, f"Sample {i} of the batch (prompt {prompt!r})")
                for i, (prompt, image) in enumerate(zip(prompts, images))
            ]
            keys = [(prompt, self.adapter.conditioning_key(image)) for prompt, image in zip(prompts, images)]
        else:
            images, keys = None, list(prompts)
        unique = list(dict.fromkeys(keys))
        cache = self.cache if self.use_cache else {}
        missing = [key for key in unique if key not in cache]
        rows = [keys.index(key) for key in missing]
        encoded = None
        with torch.no_grad(), self.encoders_on_device():
            if missing:
                encoded = self.adapter.encode_conditioning(
                    [prompts[r] for r in rows], None if images is None else [images[r] for r in rows]
                )
            if self.adapter.use_cfg and self.negative is None:
                self.negative = {k: v.to(self.device) for k, v in self.adapter.negative_conditioning().items()}
        if self.use_cache:
            for i, key in enumerate(missing):
                cache[key] = {name: value[i : i + 1].cpu() for name, value in encoded.items()}
            cond = {name: torch.cat([cache[key][name] for key in unique]).to(self.device) for name in cache[unique[0]]}
        else:
            cond = {name: value.to(self.device) for name, value in encoded.items()}
        index = torch.tensor([unique.index(key) for key in keys], device=self.device)
        return index_conditioning(cond, index), (self.negative if self.adapter.use_cfg else None)
