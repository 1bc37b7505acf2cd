"""HPSv3 and ImageReward on tiny checkpoints written in the real files' formats, against independent computations.

The reference packages cannot be installed here (`hpsv3` pins transformers 4.45.2, `image-reward` timm 0.6.13 and
fairscale), so each reward is checked against a computation that follows the reference code step by step on the
checkpoint's own key names: for ImageReward, BLIP's timm ViT and "med" BERT written out in plain torch (no transformers
BLIP classes); for HPSv3, its `Qwen2VLRewardModelBT` (a `Qwen2VLForConditionalGeneration` subclass with the reward head,
`load_state_dict(strict=True)` of the whole file, its forward) on PIL images through the base model's processor.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trl_dancegrpo.rewards import (
    HPSv3Reward,
    ImageReward,
    RewardModelNotFoundError,
    clear_model_cache,
    get_reward,
    tiny,
)
from trl_dancegrpo.rewards.hpsv3 import REWARD_TOKEN, build_hpsv3_prompt, ranknet_head
from trl_dancegrpo.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

from .test_rewards_models import populate_hub_cache, to_pil, uint8_images


PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat"]


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An offline Hugging Face cache in `tmp_path/hub`; returns a function that puts files in it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    clear_model_cache()
    yield lambda repo_id, files: populate_hub_cache(tmp_path / "hub", repo_id, files)
    clear_model_cache()


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    return tiny.save_tiny_imagereward(str(tmp_path_factory.mktemp("imagereward")))


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    return tiny.save_tiny_hpsv3(str(tmp_path_factory.mktemp("hpsv3")))


# --------------------------------------------------------------------------------------------------------------------
# ImageReward


def reference_imagereward(files: dict, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
    """ImageReward.score (github.com/THUDM/ImageReward) on the checkpoint's keys: BLIP's ViT and med BERT in torch."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizer

    sd = torch.load(files["checkpoint_path"], weights_only=True)
    with open(files["med_config_path"]) as f:
        med = json.load(f)

    def ln(x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    def linear(x, prefix):
        return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])

    # The reference `_transform(224)`, at the checkpoint's image size.
    vit = "blip.visual_encoder."
    patch = sd[vit + "patch_embed.proj.weight"].shape[-1]
    size = math.isqrt(sd[vit + "pos_embed"].shape[1] - 1) * patch
    transform = Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    pixels = torch.stack([transform(to_pil(image)) for image in images])
    # VisionTransformer.forward (timm layout, LayerNorm eps 1e-6, heads of 64 channels)
    x = F.conv2d(pixels, sd[vit + "patch_embed.proj.weight"], sd[vit + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[vit + "cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[vit + "pos_embed"]
    width = x.shape[-1]
    heads = width // 64
    depth = 1 + max(int(key.split(".")[3]) for key in sd if key.startswith(vit + "blocks."))
    for i in range(depth):
        block = f"{vit}blocks.{i}."
        h = ln(x, block + "norm1", 1e-6)
        qkv = linear(h, block + "attn.qkv").reshape(*h.shape[:2], 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        x = x + linear((attention @ qkv[2]).transpose(1, 2).reshape(h.shape), block + "attn.proj")
        x = x + linear(F.gelu(linear(ln(x, block + "norm2", 1e-6), block + "mlp.fc1")), block + "mlp.fc2")
    image_embeds = ln(x, vit + "norm", 1e-6)

    # init_tokenizer() and BertModel(mode="multimodal") of med.py
    tokenizer = BertTokenizer.from_pretrained(files["tokenizer_name_or_path"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    text = "blip.text_encoder."
    eps, num_heads = med["layer_norm_eps"], med["num_attention_heads"]
    length = tokens.input_ids.shape[1]
    x = sd[text + "embeddings.word_embeddings.weight"][tokens.input_ids]
    x = ln(x + sd[text + "embeddings.position_embeddings.weight"][:length], text + "embeddings.LayerNorm", eps)
    self_mask = (1.0 - tokens.attention_mask[:, None, None, :].float()) * -10000.0

    def attention_block(x, context, prefix, mask):
        def heads_of(y):
            return y.view(*y.shape[:2], num_heads, -1).transpose(1, 2)

        q, k, v = (
            heads_of(linear(inp, prefix + name))
            for inp, name in ((x, "self.query"), (context, "self.key"), (context, "self.value"))
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return ln(linear(out, prefix + "output.dense") + x, prefix + "output.LayerNorm", eps)

    for i in range(med["num_hidden_layers"]):
        layer = f"{text}encoder.layer.{i}."
        x = attention_block(x, x, layer + "attention.", self_mask)
        x = attention_block(x, image_embeds, layer + "crossattention.", 0.0)  # image mask all ones: adds 0
        h = linear(F.gelu(linear(x, layer + "intermediate.dense")), layer + "output.dense")
        x = ln(h + x, layer + "output.LayerNorm", eps)
    rewards = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # MLP (dropouts in between are inactive in eval)
        rewards = linear(rewards, f"mlp.layers.{index}")
    return (rewards[:, 0] - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def test_imagereward_matches_the_reference_computation(imagereward_files):
    images = uint8_images(3, tiny.TINY_IMAGEREWARD_IMAGE_SIZE)
    reward = ImageReward(device="cpu", **imagereward_files)
    scores = torch.tensor(reward(PROMPTS, images))
    expected = reference_imagereward(imagereward_files, PROMPTS, images)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert scores[0] != scores[2]  # the same prompt: the image matters
    raw = ImageReward(device="cpu", normalize=False, **imagereward_files)(PROMPTS, images)
    torch.testing.assert_close(torch.tensor(raw), expected * IMAGEREWARD_STD + IMAGEREWARD_MEAN, atol=1e-4, rtol=1e-5)


def smooth_uint8_images(num: int, height: int, width: int) -> torch.Tensor:
    """Smooth random images (upsampled 4 x 4 noise, rounded to 8 bits): resizing them is about the same in PIL and
    torch, unlike pixel noise."""
    coarse = torch.rand(num, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    return (F.interpolate(coarse, (height, width), mode="bilinear") * 255).round() / 255


def test_imagereward_resizes_and_crops_like_the_reference(imagereward_files):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    images = smooth_uint8_images(2, 48, 40)  # the shortest side resized to 32, then center cropped
    reward = ImageReward(device="cpu", **imagereward_files)
    seen = []
    handle = reward.loaded.vision.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True
    )
    try:
        reward(PROMPTS[:2], images)
    finally:
        handle.remove()
    size = tiny.TINY_IMAGEREWARD_IMAGE_SIZE
    transform = Compose(  # the reference `_transform(n_px)`
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    expected = torch.stack([transform(to_pil(image)) for image in images])
    # The reference resizes 8-bit PIL images, we resize float tensors: equal up to that rounding (0.03 here is 1/130
    # of the [0, 1] range after CLIP's normalisation).
    torch.testing.assert_close(seen[0], expected, atol=0.03, rtol=0)


def test_imagereward_through_the_hub_path_offline(imagereward_files, hub_cache):
    hub_cache(
        "THUDM/ImageReward",
        {
            "ImageReward.pt": imagereward_files["checkpoint_path"],
            "med_config.json": imagereward_files["med_config_path"],
        },
    )
    hub_cache(
        "google-bert/bert-base-uncased", {"vocab.txt": imagereward_files["tokenizer_name_or_path"] + "/vocab.txt"}
    )
    images = uint8_images(3, tiny.TINY_IMAGEREWARD_IMAGE_SIZE)
    reward = get_reward("imagereward", device="cpu")
    assert reward.__name__ == "imagereward"
    torch.testing.assert_close(
        torch.tensor(reward(PROMPTS, images)),
        reference_imagereward(imagereward_files, PROMPTS, images),
        atol=1e-4,
        rtol=1e-5,
    )


def test_imagereward_missing_offline_names_the_argument(hub_cache):
    with pytest.raises(RewardModelNotFoundError, match=r"THUDM/ImageReward.*checkpoint_path="):
        ImageReward(device="cpu")(["a cat"], uint8_images(1, 32))


# --------------------------------------------------------------------------------------------------------------------
# HPSv3


def reference_hpsv3(files: dict, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
    """HPSv3RewardInferencer.reward (github.com/MizzenAI/HPSv3): Qwen2VLRewardModelBT loaded strictly from the file."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    class Qwen2VLRewardModelBT(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.rm_head = ranknet_head(config.text_config.hidden_size, output_dim=2)

        def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw):
            inputs_embeds = self.model.language_model.embed_tokens(input_ids)
            image_embeds = self.model.visual(pixel_values, grid_thw=image_grid_thw).pooler_output
            image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds.to(inputs_embeds.dtype))
            hidden = self.model(input_ids=None, attention_mask=attention_mask, inputs_embeds=inputs_embeds)[0]
            logits = self.rm_head(hidden.float())
            return logits[input_ids == self.special_token_id].view(len(input_ids), -1)

    processor = AutoProcessor.from_pretrained(files["base_model_name_or_path"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config = AutoConfig.from_pretrained(files["base_model_name_or_path"])
    config.text_config.vocab_size = len(processor.tokenizer)  # model.resize_token_embeddings(len(tokenizer))
    model = Qwen2VLRewardModelBT(config).eval()
    model.special_token_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    model.load_state_dict(load_file(files["checkpoint_path"]), strict=True)
    messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_hpsv3_prompt(prompt)}]}]
        for prompt in prompts
    ]
    batch = processor(
        text=processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        images=[to_pil(image) for image in images],  # already min_pixels = max_pixels: qwen-vl-utils keeps them
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    return logits[:, 0]  # mu (logits[:, 1] is sigma)


def test_hpsv3_matches_the_reference_computation_and_pads_right(hpsv3_files):
    images = uint8_images(3, 32)
    prompts = ["a cat", "a very long prompt about a red car parked on a street", "a cat"]  # padding matters
    reward = HPSv3Reward(device="cpu", pixels=tiny.TINY_HPSV3_PIXELS, **hpsv3_files)
    scores = torch.tensor(reward(prompts, images))
    expected = reference_hpsv3(hpsv3_files, prompts, images)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert scores[0] != scores[2]  # the same prompt: the image matters
    one_by_one = HPSv3Reward(device="cpu", pixels=tiny.TINY_HPSV3_PIXELS, batch_size=1, **hpsv3_files)
    torch.testing.assert_close(torch.tensor(one_by_one(prompts, images)), scores, atol=1e-5, rtol=1e-4)


def test_hpsv3_reads_the_pre_4_52_key_layout(hpsv3_files, tmp_path):
    from safetensors.torch import load_file, save_file

    legacy = {}
    for key, value in load_file(hpsv3_files["checkpoint_path"]).items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        legacy[key] = value
    save_file(legacy, str(tmp_path / "HPSv3.safetensors"))
    images = uint8_images(2, 32)
    legacy_reward = HPSv3Reward(
        device="cpu",
        pixels=tiny.TINY_HPSV3_PIXELS,
        checkpoint_path=str(tmp_path / "HPSv3.safetensors"),
        base_model_name_or_path=hpsv3_files["base_model_name_or_path"],
    )
    reward = HPSv3Reward(device="cpu", pixels=tiny.TINY_HPSV3_PIXELS, **hpsv3_files)
    assert legacy_reward(PROMPTS[:2], images) == reward(PROMPTS[:2], images)


def test_hpsv3_resizes_to_the_pixel_budget_on_the_patch_grid(hpsv3_files, monkeypatch):
    reward = HPSv3Reward(device="cpu", pixels=tiny.TINY_HPSV3_PIXELS, **hpsv3_files)
    images = uint8_images(2, 64)[..., :40]  # 64 x 40 -> about 1024 pixels on the 8-pixel grid
    resized = reward._resize(reward.loaded, images)
    assert resized.shape[-2:] == (40, 24)
    assert len(reward(PROMPTS[:2], images)) == 2


def test_hpsv3_through_the_hub_path_offline(hpsv3_files, hub_cache):
    import os

    base = hpsv3_files["base_model_name_or_path"]
    hub_cache("MizzenAI/HPSv3", {"HPSv3.safetensors": hpsv3_files["checkpoint_path"]})
    hub_cache("Qwen/Qwen2-VL-7B-Instruct", {name: os.path.join(base, name) for name in os.listdir(base)})
    reward = get_reward("hpsv3", device="cpu", pixels=tiny.TINY_HPSV3_PIXELS)
    assert reward.__name__ == "hpsv3"
    images = uint8_images(3, 32)
    torch.testing.assert_close(
        torch.tensor(reward(PROMPTS, images)), reference_hpsv3(hpsv3_files, PROMPTS, images), atol=1e-5, rtol=1e-4
    )
    clear_model_cache()
    with pytest.raises(RewardModelNotFoundError, match=r"'Other/Missing'.*base_model_name_or_path="):
        HPSv3Reward(device="cpu", base_model_name_or_path="Other/Missing")(["a"], images[:1])


# --------------------------------------------------------------------------------------------------------------------
# Both


@pytest.mark.parametrize("name", ["hpsv3", "imagereward"])
def test_rewards_follow_the_trainer_dtype_and_keep_their_head_in_float32(name, hpsv3_files, imagereward_files):
    if name == "hpsv3":
        make = lambda **kwargs: HPSv3Reward(pixels=tiny.TINY_HPSV3_PIXELS, **hpsv3_files, **kwargs)  # noqa: E731
    else:
        make = lambda **kwargs: ImageReward(**imagereward_files, **kwargs)  # noqa: E731
    images = uint8_images(2, 32, seed=5)
    reference = make(device="cpu")(PROMPTS[:2], images)
    reward = make()
    reward.set_device("cpu", torch.bfloat16)  # what the trainer does with bf16 training
    scores = reward(PROMPTS[:2], images)
    backbone = reward.loaded.model if name == "hpsv3" else reward.loaded.vision
    head = reward.loaded.head if name == "hpsv3" else reward.loaded.mlp
    assert next(backbone.parameters()).dtype == torch.bfloat16
    assert next(head.parameters()).dtype == torch.float32
    torch.testing.assert_close(
        torch.tensor(scores), torch.tensor(reference), atol=0.1 * max(map(abs, reference)) + 0.02, rtol=0
    )
