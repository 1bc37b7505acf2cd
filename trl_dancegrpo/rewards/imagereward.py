"""ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP image-text encoder with a small MLP head, trained on human rankings of generated images.

The public checkpoint (Hub repository `THUDM/ImageReward`) is `ImageReward.pt`, a torch state dict of the reference
`ImageReward` module, and `med_config.json`, the BERT configuration of its text encoder:

    blip.visual_encoder.*    BLIP's ViT-L/16 at 224 pixels (timm layout: cls_token, pos_embed, patch_embed.proj,
                             blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm)
    blip.text_encoder.*      BLIP's BERT with a cross-attention to the image in every layer ("med"), whose key names
                             are those of transformers' `BlipTextModel`
    blip.vision_proj, blip.text_proj   contrastive projections (unused by the reward)
    mlp.layers.{0,2,4,6,7}   the reward head: Linear 768-1024-128-64-16-1, no activations (dropouts in between)

The `image-reward` package pins timm 0.6.13 and fairscale, so we load these weights into transformers'
`BlipVisionModel` and `BlipTextModel` instead. Scoring follows the reference's `ImageReward.score`: the image resized
(bicubic, shortest side) and center cropped to 224 and normalised with CLIP's mean and std; the prompt tokenised by
`bert-base-uncased` padded to 35 tokens; the text encoder's [CLS] output (cross-attending the image) through the MLP,
then standardised with the reference's mean and std.
"""

import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._base import ModelReward
from ._loading import load_state_dict, local_or_hub_dir, local_or_hub_file, source_key
from ._preprocessing import preprocess
from .image import AestheticMLP


IMAGEREWARD_REPO_ID = "THUDM/ImageReward"
# The reference loads `BertTokenizer.from_pretrained("bert-base-uncased")`, now served as this repository.
BERT_TOKENIZER_REPO_ID = "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP's ViT blocks have heads of 64 channels (ViT-B: 768/12, ViT-L: 1024/16); the head count is not in the weights.
_VIT_HEAD_DIM = 64

_VISION_KEYS = (
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
)


# ImageReward's head is the LAION aesthetic predictor's MLP: five linear layers, no activations (both references
# comment their ReLUs out), the same parameter names
ImageRewardMLP = AestheticMLP


def convert_imagereward_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split `ImageReward.pt` into state dicts of transformers' `BlipVisionModel`, `BlipTextModel` and the MLP."""
    vision, text, mlp = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name == "cls_token":
                name = "embeddings.class_embedding"
            elif name == "pos_embed":
                name = "embeddings.position_embedding"
            elif name.startswith("patch_embed.proj."):
                name = "embeddings.patch_embedding." + name.removeprefix("patch_embed.proj.")
            elif name.startswith("norm."):
                name = "post_layernorm." + name.removeprefix("norm.")
            elif name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                for old, new in _VISION_KEYS:
                    if rest.startswith(old):
                        rest = new + rest.removeprefix(old)
                        break
                name = f"encoder.layers.{index}.{rest}"
            vision[name] = value
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if name != "embeddings.position_ids":  # a buffer, rebuilt by the model
                text[name] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
    if not vision or not text or not mlp:
        raise ValueError(
            "This is not an ImageReward checkpoint: expected `blip.visual_encoder.*`, `blip.text_encoder.*` and "
            "`mlp.*` weights."
        )
    return vision, text, mlp


def imagereward_configs(vision: dict[str, torch.Tensor], med_config: dict):
    """transformers BLIP configurations of the vision tower (read off its weights) and of the text encoder (from
    `med_config.json`, whose `encoder_width` the reference overrides with the vision width)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch_size = vision["embeddings.patch_embedding.weight"].shape[-1]
    num_patches = vision["embeddings.position_embedding"].shape[1] - 1
    depth = 1 + max(int(key.split(".")[2]) for key in vision if key.startswith("encoder.layers."))
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(width // _VIT_HEAD_DIM, 1),
        image_size=math.isqrt(num_patches) * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # timm ViT's LayerNorm in BLIP
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,  # BLIP's [DEC] and [SEP] ids: unused by the encoder
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; the forward runs bidirectionally (is_decoder=False)
    )
    return vision_config, text_config


@dataclass
class _LoadedImageReward:
    vision: nn.Module
    text: nn.Module
    mlp: nn.Module
    tokenizer: object
    image_size: int


class ImageReward(ModelReward):
    r"""
    ImageReward: human preference for a generated image given its prompt (BLIP + MLP head), standardised as the
    reference does (about zero mean, unit variance over its training images).

    Args:
        checkpoint_path (`str`, *optional*):
            Local path of `ImageReward.pt`. `None` downloads it from the Hub repository `THUDM/ImageReward`.
        med_config_path (`str`, *optional*):
            Local path of `med_config.json`. `None` downloads it from the same repository.
        tokenizer_name_or_path (`str`, *optional*, defaults to `"google-bert/bert-base-uncased"`):
            Hub id or local folder of the BERT tokenizer (`vocab.txt`).
        normalize (`bool`, *optional*, defaults to `True`):
            Standardise with the reference's mean and std (the scores of `ImageReward.score`). `False` gives the MLP's
            raw output.
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the BLIP encoders (the head runs in float32). `None` follows the trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            Images per forward pass; does not change the scores.
    """

    __name__ = "imagereward"

    def __init__(
        self,
        checkpoint_path: str | None = None,
        med_config_path: str | None = None,
        tokenizer_name_or_path: str = BERT_TOKENIZER_REPO_ID,
        normalize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.checkpoint_path = checkpoint_path
        self.med_config_path = med_config_path
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.normalize = normalize

    def _cache_key(self) -> tuple:
        return (source_key(self.checkpoint_path), source_key(self.med_config_path), self.tokenizer_name_or_path)

    def check_weights(self) -> None:
        """Find (or download) the checkpoint now: the trainer calls this before it loads the pipeline."""
        local_or_hub_file(self.checkpoint_path, IMAGEREWARD_REPO_ID, "ImageReward.pt", argument="checkpoint_path")

    def _load(self, device: torch.device, dtype: torch.dtype) -> _LoadedImageReward:
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        checkpoint = local_or_hub_file(
            self.checkpoint_path, IMAGEREWARD_REPO_ID, "ImageReward.pt", argument="checkpoint_path"
        )
        config_file = local_or_hub_file(
            self.med_config_path, IMAGEREWARD_REPO_ID, "med_config.json", argument="med_config_path"
        )
        tokenizer_dir = local_or_hub_dir(
            self.tokenizer_name_or_path,
            ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"],
            argument="tokenizer_name_or_path",
        )
        with open(config_file) as f:
            med_config = json.load(f)
        vision_weights, text_weights, mlp_weights = convert_imagereward_state_dict(load_state_dict(checkpoint))
        vision_config, text_config = imagereward_configs(vision_weights, med_config)
        with torch.device(device):
            vision = BlipVisionModel._from_config(vision_config, dtype=dtype)
            text = BlipTextModel._from_config(text_config, dtype=dtype, add_pooling_layer=False)
            mlp = ImageRewardMLP(mlp_weights["layers.0.weight"].shape[1])
        vision.load_state_dict(vision_weights, strict=True)
        text.load_state_dict(text_weights, strict=True)
        mlp.load_state_dict(mlp_weights, strict=True)
        return _LoadedImageReward(
            vision=vision.eval().requires_grad_(False),
            text=text.eval().requires_grad_(False),
            mlp=mlp.float().eval().requires_grad_(False),
            tokenizer=BertTokenizer.from_pretrained(tokenizer_dir),
            image_size=vision_config.image_size,
        )

    def _score(self, loaded: _LoadedImageReward, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        size = (loaded.image_size, loaded.image_size)
        pixels = preprocess(images, size, _CLIP_MEAN, _CLIP_STD, "shortest", device=self.device, dtype=self.dtype)
        image_embeds = loaded.vision(pixel_values=pixels).last_hidden_state
        tokens = loaded.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        text_output = loaded.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            is_decoder=False,
        )
        rewards = loaded.mlp(text_output.last_hidden_state[:, 0].float())[:, 0]
        if self.normalize:
            rewards = (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        return rewards
