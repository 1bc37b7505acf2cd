"""HPSv3 (Ma et al., 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): a Qwen2-VL-7B preference model
that scores an image against its prompt.

The public checkpoint (Hub repository `MizzenAI/HPSv3`) is `HPSv3.safetensors`, the state dict of the reference's
`Qwen2VLRewardModelBT` (a `Qwen2VLForConditionalGeneration` with a reward head):

    model.language_model.*, model.visual.*   Qwen2-VL (transformers >= 4.52 names; `model.*` / `visual.*` before)
    lm_head.weight                           unused
    rm_head.{0,3,5}.*                        the "ranknet" head: Linear(hidden, 1024) - ReLU - Dropout - Linear(1024,
                                             16) - ReLU - Linear(16, 2), in float32

with the token embeddings resized for the added special token `<|Reward|>`. The base model `Qwen/Qwen2-VL-7B-Instruct`
gives the config and the processor. The `hpsv3` package pins transformers 4.45.2, so we load the weights into
transformers' `Qwen2VLModel` and score as its `HPSv3RewardInferencer.reward` does: the image resized to
`256 * 28 * 28` pixels on the 28-pixel grid (qwen-vl-utils' `smart_resize`, `min_pixels = max_pixels`), the
instruction below around the prompt followed by `<|Reward|>`, the chat template with a generation prompt, right
padding; the reward is the first output (mu; the second is the uncertainty sigma) of the head at `<|Reward|>`.
The reference's forward calls the language model without the image grid, so positions are plain 1-D positions
(M-RoPE's text fallback), not Qwen2-VL's 3-D image positions; we do the same.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import ModelReward
from ._loading import (
    build_qwen2_vl_backbone,
    load_state_dict,
    local_or_hub_dir,
    local_or_hub_file,
    source_key,
    split_qwen2_vl_reward_weights,
)


HPSV3_REPO_ID = "MizzenAI/HPSv3"
HPSV3_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
HPSV3_PIXELS = 256 * 28 * 28

# HPSv3's instruction and reward prompt (hpsv3/dataset/data_collator_qwen.py of github.com/MizzenAI/HPSv3, MIT
# license), kept byte for byte (trailing spaces included): the model was trained on exactly this text.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
HPSV3_REWARD_PROMPT = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def build_hpsv3_prompt(prompt: str) -> str:
    """The text HPSv3 scores an image against: its instruction around the prompt, then the reward prompt."""
    return HPSV3_INSTRUCTION.replace("{text_prompt}", prompt) + HPSV3_REWARD_PROMPT


def convert_hpsv3_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split `HPSv3.safetensors` into state dicts of transformers' `Qwen2VLModel` and of the reward head."""
    backbone, head = split_qwen2_vl_reward_weights(state_dict, keep_other_keys=False)
    if not {"0.weight", "3.weight", "5.weight"} <= set(head):
        raise ValueError(
            "This is not an HPSv3 checkpoint: expected the ranknet reward head `rm_head.0`, `rm_head.3`, `rm_head.5`."
        )
    return backbone, head


def ranknet_head(hidden_size: int, output_dim: int = 2, width: int = 1024) -> nn.Sequential:
    """HPSv3's reward head ("ranknet" without `rm_head_kwargs`); indices match the checkpoint's keys."""
    return nn.Sequential(
        nn.Linear(hidden_size, width),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(width, 16),
        nn.ReLU(),
        nn.Linear(16, output_dim),
    )


@dataclass
class _LoadedHPSv3:
    model: nn.Module  # transformers Qwen2VLModel
    head: nn.Sequential
    processor: object
    reward_token_id: int


class HPSv3Reward(ModelReward):
    r"""
    HPSv3: human preference for a generated image given its prompt (a Qwen2-VL-7B reward model; the scores of
    HPSv3's inference, roughly 0 to 15 for real images).

    Args:
        checkpoint_path (`str`, *optional*):
            Local path of `HPSv3.safetensors`. `None` downloads it from the Hub repository `MizzenAI/HPSv3`.
        base_model_name_or_path (`str`, *optional*, defaults to `"Qwen/Qwen2-VL-7B-Instruct"`):
            Hub id or local folder of the base Qwen2-VL (only its config and processor files are read; the
            checkpoint holds every weight).
        pixels (`int`, *optional*, defaults to `200704`):
            Pixels of an image after resizing (HPSv3 uses `256 * 28 * 28`, i.e. 448 x 448 for a square image).
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the Qwen2-VL model (the head runs in float32). `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `4`):
            Images per forward pass; does not change the scores.
    """

    __name__ = "hpsv3"

    def __init__(
        self,
        checkpoint_path: str | None = None,
        base_model_name_or_path: str = HPSV3_BASE_MODEL,
        pixels: int = HPSV3_PIXELS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 4,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if not isinstance(pixels, int) or pixels < 1:
            raise ValueError(f"pixels must be a positive integer, got {pixels!r}.")
        self.checkpoint_path = checkpoint_path
        self.base_model_name_or_path = base_model_name_or_path
        self.pixels = pixels

    def _cache_key(self) -> tuple:
        return (source_key(self.checkpoint_path), source_key(self.base_model_name_or_path))

    def check_weights(self) -> None:
        """Find (or download) the checkpoint now: the trainer calls this before it loads the pipeline."""
        local_or_hub_file(self.checkpoint_path, HPSV3_REPO_ID, "HPSv3.safetensors", argument="checkpoint_path")

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedHPSv3:
        from transformers import AutoProcessor

        checkpoint = local_or_hub_file(
            self.checkpoint_path, HPSV3_REPO_ID, "HPSv3.safetensors", argument="checkpoint_path"
        )
        base_dir = local_or_hub_dir(
            self.base_model_name_or_path,
            ["*.json", "*.txt", "*.jinja"],  # config, processor and tokenizer; the checkpoint holds the weights
            argument="base_model_name_or_path",
        )
        processor = AutoProcessor.from_pretrained(base_dir, padding_side="right")
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        backbone_weights, head_weights = convert_hpsv3_state_dict(load_state_dict(checkpoint))
        model, _ = build_qwen2_vl_backbone(base_dir, backbone_weights, device, dtype, "HPSv3")
        head = ranknet_head(head_weights["0.weight"].shape[1], head_weights["5.weight"].shape[0])
        head.load_state_dict(head_weights, strict=True)
        return _LoadedHPSv3(
            model=model,
            head=head.to(device=device, dtype=torch.float32).eval().requires_grad_(False),
            processor=processor,
            reward_token_id=processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN),
        )

    def _resize(self, loaded: _LoadedHPSv3, images: torch.Tensor) -> torch.Tensor:
        """Resize to `self.pixels` pixels on the patch grid (qwen-vl-utils' rule with min_pixels = max_pixels)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        image_processor = loaded.processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        height, width = smart_resize(*images.shape[-2:], factor=factor, min_pixels=self.pixels, max_pixels=self.pixels)
        images = images.to(device=self.device, dtype=torch.float32)
        if (height, width) != tuple(images.shape[-2:]):
            images = F.interpolate(images, (height, width), mode="bicubic", antialias=True).clamp(0, 1)
        return images

    def _score(self, loaded: _LoadedHPSv3, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        chats = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_hpsv3_prompt(p)}]}]
            for p in prompts
        ]
        texts = loaded.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        inputs = loaded.processor(
            text=texts,
            images=list(self._resize(loaded, images)),
            padding=True,
            return_tensors="pt",
            images_kwargs={"do_resize": False, "do_rescale": False, "device": str(self.device)},
        ).to(self.device)
        model = loaded.model
        input_ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)
        image_embeds = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        image_embeds = torch.cat(image_embeds).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == model.config.image_token_id)[..., None], image_embeds)
        # No position ids: the language model's default 1-D positions, as in HPSv3's forward (see the module notes).
        hidden = model.language_model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False
        ).last_hidden_state
        is_token = input_ids == loaded.reward_token_id
        if not bool((is_token.sum(dim=1) == 1).all()):
            raise ValueError(f"Each HPSv3 prompt must hold {REWARD_TOKEN} exactly once; remove it from the prompts.")
        rows = torch.arange(len(input_ids), device=input_ids.device)
        return loaded.head(hidden[rows, is_token.int().argmax(dim=1)].float())[:, 0]
