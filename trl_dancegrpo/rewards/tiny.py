"""Tiny random reward checkpoints, written in exactly the real checkpoints' file formats.

No real reward weights are needed to exercise the loading code: each builder writes a model of a few hundred
thousand parameters where the real one would be (an HPS `{"state_dict": ...}` file, a transformers `CLIPModel`
folder, the aesthetic MLP's state dict, a VideoAlign folder with `model_config.json` and `checkpoint-<step>/model.pth`
next to a Qwen2-VL base folder). Pass the paths to the rewards' local-path arguments. Used by the tests, the CPU
benchmarks and offline demos; the scores are meaningless.
"""

import copy
import json
import os
import string
import tempfile

import torch


TINY_OPEN_CLIP_MODEL = "trl-dancegrpo-tiny-clip"
_TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # The real CLIP BPE vocabulary (shipped with open_clip) and context length, so open_clip's tokenizer fits.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_REGISTERED_DIR = None


def register_tiny_open_clip_config() -> str:
    """Register the tiny open_clip architecture [`TINY_OPEN_CLIP_MODEL`] (32x32 images) and return its name."""
    global _REGISTERED_DIR
    import open_clip

    if _REGISTERED_DIR is None or open_clip.get_model_config(TINY_OPEN_CLIP_MODEL) is None:
        _REGISTERED_DIR = tempfile.mkdtemp(prefix="trl_dancegrpo_open_clip_")
        path = os.path.join(_REGISTERED_DIR, f"{TINY_OPEN_CLIP_MODEL}.json")
        with open(path, "w") as f:
            json.dump(_TINY_OPEN_CLIP_CONFIG, f)
        open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_MODEL


def save_tiny_hps_checkpoint(path: str, seed: int = 0) -> str:
    """Write a tiny HPS checkpoint to the file `path`: `{"state_dict": ...}` of a whole open_clip CLIP model, as
    `HPS_v2.1_compressed.pt`. Load it with `HPSReward(checkpoint_path=path, clip_model=TINY_OPEN_CLIP_MODEL)`."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(register_tiny_open_clip_config(), pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


_CHARS = list(string.ascii_lowercase + string.digits + ",.!?-'")


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # Without merges, CLIP's BPE splits every word into characters, the last one carrying the "</w>" suffix.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in _CHARS:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def save_tiny_clip_model(path: str, seed: int = 0, projection_dim: int = 32, processor_path: str | None = None) -> str:
    """Write a tiny transformers `CLIPModel` (32x32 images) and its processor to the folder `path`, as the PickScore
    and `openai/clip-vit-large-patch14` repositories hold them. The processor goes to `processor_path` if given."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    # Saved separately, as the Hub repositories hold them: `preprocessor_config.json` and the tokenizer files.
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        processor_path or path
    )
    tokenizer.save_pretrained(processor_path or path)
    return path


def save_tiny_aesthetic_checkpoint(path: str, input_size: int = 32, seed: int = 0) -> str:
    """Write a tiny aesthetic MLP's state dict to the file `path`, as `sac+logos+ava1-l14-linearMSE.pth` (whose input
    size is 768, CLIP ViT-L/14's; here that of [`save_tiny_clip_model`]'s projection)."""
    from .image import AestheticMLP

    torch.manual_seed(seed)
    torch.save(AestheticMLP(input_size).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# VideoAlign

_QWEN_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template, reduced to what a user turn with an image or a video and a text needs.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VIDEOALIGN_FRAME_SIZE = 96  # frames of this size are already on the tiny model's patch grid


def tiny_qwen2_vl_processor():
    """A Qwen2-VL processor with a byte-level tokenizer (no merges) and 4-pixel patches."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=_QWEN_SPECIAL_TOKENS)
    patches = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
    pixels = {"min_pixels": 8 * 8, "max_pixels": TINY_VIDEOALIGN_FRAME_SIZE**2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patches, **pixels),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _tiny_qwen2_vl_config(processor):
    """A Qwen2-VL config of hidden size 32 for [`tiny_qwen2_vl_processor`]'s tokenizer."""
    from transformers import Qwen2VLConfig

    ids = {token: processor.tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            "bos_token_id": 0,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": 0,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_videoalign_model(seed: int = 0):
    """The tiny VideoAlign reward model as VideoAlign trains it, and its processor (with the reward tokens).

    A Qwen2-VL with a bias-free scalar head `rm_head`, the token embeddings resized to the reward tokens, and LoRA
    (r=4, alpha=8) on every linear layer of the language model, wrapped by PEFT; LoRA weights are random (not zero)
    so that their merge matters. Returns `(peft_model, processor)`.
    """
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    from .video import REWARD_TOKENS

    class Qwen2VLRewardModel(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.rm_head = nn.Linear(config.text_config.hidden_size, 1, bias=False)

    processor = tiny_qwen2_vl_processor()
    config = _tiny_qwen2_vl_config(processor)
    torch.manual_seed(seed)
    model = Qwen2VLRewardModel(config)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    excluded = ("lm_head", "rm_head", "embed_tokens", "visual")  # VideoAlign's lora_namespan_exclude
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(part in name for part in excluded)
    ]
    lora = LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return peft_model.eval(), processor


def save_tiny_videoalign(path: str, seed: int = 0, step: int = 2) -> str:
    """Write a tiny VideoAlign checkpoint to the folder `path/reward` (and its base model to `path/base`).

    `path/reward` is laid out like the Hub repository `KwaiVGI/VideoReward`: `model_config.json` and
    `checkpoint-<step>/model.pth`, the full PEFT state dict with transformers 4.4x's Qwen2-VL key names; its
    `model_config.model_name_or_path` names `path/base`, which holds the base model's config and processor, like
    `Qwen/Qwen2-VL-2B-Instruct` (whose weights the reward does not need). Returns the reward folder, for
    `VideoAlignReward(model_name_or_path=...)`.
    """
    from .video import DIMENSIONS

    peft_model, processor = tiny_videoalign_model(seed)
    base_dir, reward_dir = os.path.join(path, "base"), os.path.join(path, "reward")
    base_processor = tiny_qwen2_vl_processor()  # the base tokenizer has no reward tokens
    base_processor.save_pretrained(base_dir)
    base_config = copy.deepcopy(peft_model.get_base_model().config)
    base_config.text_config.vocab_size = len(base_processor.tokenizer)
    base_config.save_pretrained(base_dir)
    os.makedirs(os.path.join(reward_dir, f"checkpoint-{step}"), exist_ok=True)
    state_dict = {}
    for key, value in peft_model.state_dict().items():
        # transformers < 4.52 (VideoAlign's) had the language model at `model` and the vision tower at `visual`.
        key = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
        key = key.replace("base_model.model.model.visual.", "base_model.model.visual.")
        state_dict[key] = value.clone()
    torch.save(state_dict, os.path.join(reward_dir, f"checkpoint-{step}", "model.pth"))
    model_config = {
        "data_config": {
            "max_frame_pixels": TINY_VIDEOALIGN_FRAME_SIZE**2,
            "num_frames": None,
            "fps": 2.0,
            "eval_dim": list(DIMENSIONS),
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": os.path.abspath(base_dir),
            "output_dim": 1,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {
            "lora_enable": True,
            "vision_lora": False,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.05,
            "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
            "lora_task_type": "CAUSAL_LM",
            "use_rslora": False,
            "num_lora_modules": -1,
        },
        # VideoAlign's published calibration.
        "inference_config": {
            "VQ_mean": 3.6757,
            "VQ_std": 2.2476,
            "MQ_mean": 1.1646,
            "MQ_std": 1.3811,
            "TA_mean": 2.8105,
            "TA_std": 2.5121,
        },
    }
    with open(os.path.join(reward_dir, "model_config.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    return reward_dir


# --------------------------------------------------------------------------------------------------------------------
# HPSv3

TINY_HPSV3_PIXELS = 32 * 32  # HPSv3Reward(pixels=...) for the tiny model: 32 x 32 images on its 8-pixel grid


def tiny_hpsv3_model(seed: int = 0):
    """The tiny HPSv3 reward model as HPSv3 builds it (`Qwen2VLRewardModelBT`): a Qwen2-VL with the `<|Reward|>` token
    added, the token embeddings resized, and the "ranknet" head `rm_head` (mu, sigma). Returns `(model, processor)`."""
    from transformers import Qwen2VLForConditionalGeneration

    from .hpsv3 import REWARD_TOKEN, ranknet_head

    class Qwen2VLRewardModel(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.rm_head = ranknet_head(config.text_config.hidden_size, output_dim=2)

    processor = tiny_qwen2_vl_processor()
    config = _tiny_qwen2_vl_config(processor)
    torch.manual_seed(seed)
    model = Qwen2VLRewardModel(config)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    with torch.no_grad():  # larger than the default initialisation: scores that differ between images and prompts
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.normal_(std=0.2)
    return model.eval(), processor


def save_tiny_hpsv3(path: str, seed: int = 0) -> dict[str, str]:
    """Write a tiny HPSv3 checkpoint `path/HPSv3.safetensors` (the reward model's whole state dict, as in the Hub
    repository `MizzenAI/HPSv3`) and its base model's config and processor to `path/base` (as
    `Qwen/Qwen2-VL-7B-Instruct`). Returns `{"checkpoint_path": ..., "base_model_name_or_path": ...}`, the arguments of
    `HPSv3Reward` (with `pixels=TINY_HPSV3_PIXELS`)."""
    from safetensors.torch import save_file

    model, _ = tiny_hpsv3_model(seed)
    base_dir = os.path.join(path, "base")
    base_processor = tiny_qwen2_vl_processor()  # the base tokenizer has no reward token
    base_processor.save_pretrained(base_dir)
    base_config = copy.deepcopy(model.config)
    base_config.text_config.vocab_size = len(base_processor.tokenizer)
    base_config.save_pretrained(base_dir)
    checkpoint = os.path.join(path, "HPSv3.safetensors")
    save_file({key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}, checkpoint)
    return {"checkpoint_path": checkpoint, "base_model_name_or_path": base_dir}


# --------------------------------------------------------------------------------------------------------------------
# ImageReward

TINY_IMAGEREWARD_IMAGE_SIZE = 32


def _imagereward_original_key(component: str, key: str) -> str:
    """The name of a transformers BLIP weight in ImageReward.pt (the inverse of `convert_imagereward_state_dict`)."""
    if component == "text":
        return "blip.text_encoder." + key
    renames = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
    }
    if key in renames:
        return "blip.visual_encoder." + renames[key]
    key = key.replace("embeddings.patch_embedding.", "patch_embed.proj.").replace("post_layernorm.", "norm.")
    key = key.replace("encoder.layers.", "blocks.").replace("layer_norm1.", "norm1.").replace("layer_norm2.", "norm2.")
    key = key.replace("self_attn.qkv.", "attn.qkv.").replace("self_attn.projection.", "attn.proj.")
    return "blip.visual_encoder." + key


def save_tiny_imagereward(path: str, seed: int = 0) -> dict[str, str]:
    """Write a tiny ImageReward checkpoint to the folder `path`: `ImageReward.pt` (the reference module's state dict,
    its key names) and `med_config.json`, as in the Hub repository `THUDM/ImageReward`, plus a BERT tokenizer folder
    `path/bert` (`vocab.txt`, as `bert-base-uncased`). Returns the arguments of `ImageReward`."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from .imagereward import ImageRewardMLP

    os.makedirs(os.path.join(path, "bert"), exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CHARS, *("##" + char for char in _CHARS)]
    with open(os.path.join(path, "bert", "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(path, "bert", "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}, f)
    # The real med_config.json with smaller sizes; vocab_size counts BLIP's added [DEC] and [ENC] tokens, and
    # encoder_width (768 in the real file too) is overridden by the vision width.
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    with open(os.path.join(path, "med_config.json"), "w") as f:
        json.dump(med_config, f, indent=2)

    torch.manual_seed(seed)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=1,  # BLIP's 64-channel heads
            image_size=TINY_IMAGEREWARD_IMAGE_SIZE,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    )
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med_config["vocab_size"],
            hidden_size=32,
            encoder_hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            bos_token_id=None,
            sep_token_id=None,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    )
    mlp = ImageRewardMLP(32)
    # Larger weights than the default initialisation, so that scores differ between images, yet a gain of about 1 per
    # MLP layer, so that they do not blow up rounding (bfloat16, 8-bit images).
    with torch.no_grad():
        for name, parameter in [*vision.named_parameters(), *text.named_parameters()]:
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                parameter.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
            else:
                parameter.normal_(std=0.1)
        for parameter in mlp.parameters():
            parameter.normal_(std=parameter.shape[1] ** -0.5 if parameter.ndim > 1 else 0.1)
    state_dict = {_imagereward_original_key("vision", k): v for k, v in vision.state_dict().items()}
    state_dict.update({_imagereward_original_key("text", k): v for k, v in text.state_dict().items()})
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1).clone()
    for name, width in (("vision_proj", 64), ("text_proj", 32)):  # BLIP's contrastive projections, unused
        state_dict[f"blip.{name}.weight"] = torch.randn(256, width) * 0.02
        state_dict[f"blip.{name}.bias"] = torch.zeros(256)
    state_dict.update({f"mlp.{key}": value for key, value in mlp.state_dict().items()})
    torch.save(
        {key: value.detach().clone() for key, value in state_dict.items()}, os.path.join(path, "ImageReward.pt")
    )
    return {
        "checkpoint_path": os.path.join(path, "ImageReward.pt"),
        "med_config_path": os.path.join(path, "med_config.json"),
        "tokenizer_name_or_path": os.path.join(path, "bert"),
    }


# --------------------------------------------------------------------------------------------------------------------
# A VLM judge (Qwen2.5-VL) for a real OpenAI-compatible server

# Qwen2.5-VL's chat template, reduced to system/user/assistant turns with images and text; an image part may arrive as
# {"type": "image"} (transformers) or {"type": "image_url"} (OpenAI-style, as some servers pass it on).
_QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
JUDGE_ANSWER_TOKENS = ("yes", "Yes", "no", "No")
TINY_JUDGE_IMAGE_SIZE = 56  # 4x4 patches of 14 pixels: 4 visual tokens after the 2x2 merge


def tiny_qwen2_5_vl_judge(seed: int = 0, answer_scale: float = 4.0):
    """A tiny random Qwen2.5-VL chat model and its processor, made to answer yes or no.

    The byte-level tokenizer has `yes`, `Yes`, `no` and `No` as single tokens (merges), and their output rows make
    them the most likely first tokens of an answer (`answer_scale` is the norm of their shared part), with P(yes) near
    0.5 and depending on the image. Heads of dimension 32 (vLLM's CPU attention refuses 16).
    Returns `(model, processor)`.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab = {"<|endoftext|>": 0}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    merges = [("y", "e"), ("ye", "s"), ("Y", "e"), ("Ye", "s"), ("n", "o"), ("N", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        additional_special_tokens=_QWEN_SPECIAL_TOKENS,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    size = TINY_JUDGE_IMAGE_SIZE
    patches = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    pixels = {"min_pixels": size * size, "max_pixels": size * size}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patches, **pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patches, **pixels),
        chat_template=_QWEN2_5_VL_CHAT_TEMPLATE,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
            "bos_token_id": 0,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": 0,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Random output rows rarely put yes or no among a server's top log-probs, and then give P(yes) of 0 or 1. Point the
    # answers' rows along the final hidden state of a yes/no question (so they lead the top log-probs) and split yes
    # from no by a small random direction (so that P(yes) stays near 0.5 and moves with the image).
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Yes or no?"}]}]
    text = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    blank = torch.full((3, TINY_JUDGE_IMAGE_SIZE, TINY_JUDGE_IMAGE_SIZE), 0.5)
    inputs = processor(text=[text], images=[blank], return_tensors="pt", images_kwargs={"do_rescale": False})
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state[0, -1]
        direction = answer_scale * hidden / hidden.norm()
        for yes, no in (("yes", "no"), ("Yes", "No")):
            split = torch.randn_like(direction) * 0.05
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(yes)] = direction + split
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(no)] = direction - split
    return model, processor


def save_tiny_qwen2_5_vl_judge(path: str, seed: int = 0) -> str:
    """Write [`tiny_qwen2_5_vl_judge`]'s model and processor to the folder `path`, as a Hub repository of
    Qwen2.5-VL holds them (servers such as vLLM load it with `--model path`). Returns `path`."""
    model, processor = tiny_qwen2_5_vl_judge(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return path


def save_tiny_clap_model(path: str, seed: int = 0) -> str:
    """Write a tiny transformers `ClapModel` (HTSAT audio tower, RoBERTa text tower) and its processor files to the
    folder `path`, as `laion/clap-htsat-unfused` holds them (`config.json`, `model.safetensors`,
    `preprocessor_config.json`, the tokenizer files); its feature extractor takes 2 s at 48 kHz, 16 mel bins."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    # Without merges, byte-level BPE splits every word into characters ("\u0120" marks a leading space).
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "\u0120": 4}
    for char in _CHARS:
        vocab.setdefault(char, len(vocab))
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = ClapConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 80,
            "projection_dim": 16,
        },
        audio_config={
            "window_size": 4,
            "spec_size": 64,
            "num_mel_bins": 16,
            "patch_size": 4,
            "patch_stride": [4, 4],
            "patch_embeds_hidden_size": 16,
            "hidden_size": 32,
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "projection_dim": 16,
            "projection_hidden_size": 32,
            "enable_fusion": False,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    ClapModel(config).save_pretrained(path)
    ClapFeatureExtractor(
        feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=2, truncation="rand_trunc"
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
