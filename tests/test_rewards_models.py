"""Model rewards on tiny checkpoints written in the real files' formats, against direct computations.

Each tiny checkpoint is loaded through the path a Hub id takes (a Hugging Face cache populated with the file, offline)
and through the local-path argument; on inputs already at the model's input size, scores must match open_clip's /
transformers' own preprocessing and `encode_*` / `get_*_features` to 1e-4.
"""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from trl_dancegrpo.rewards import (
    AestheticReward,
    BinaryReward,
    CLIPScoreReward,
    HPSReward,
    PickScoreReward,
    VideoAlignReward,
    clear_model_cache,
    get_reward,
    per_frame,
    tiny,
)


open_clip = pytest.importorskip("open_clip")  # a guard only: CI installs it (with a matching torchvision)

PROMPTS = ["a photo of a cat", "a red car", "a photo of a cat"]  # a repeated prompt, as in a GRPO group


def uint8_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images whose values survive a round trip through uint8 (PIL), so library transforms see them exactly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, size, size), generator=generator).float() / 255


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def populate_hub_cache(cache_dir, repo_id: str, files: dict[str, str]) -> None:
    """Put `files` (path in the repository -> local file) in a Hugging Face cache, as a download would."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_folder, "refs"), exist_ok=True)
    with open(os.path.join(repo_folder, "refs", "main"), "w") as f:
        f.write(commit)
    for name, source in files.items():
        target = os.path.join(repo_folder, "snapshots", commit, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(source, target)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An offline Hugging Face cache in `tmp_path/hub`; returns a function that puts files in it."""
    import huggingface_hub.constants

    cache_dir = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    clear_model_cache()
    yield lambda repo_id, files: populate_hub_cache(cache_dir, repo_id, files)
    clear_model_cache()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of every model reward, written once for this module."""
    root = tmp_path_factory.mktemp("reward-checkpoints")
    clip_dir = str(root / "clip")
    tiny.save_tiny_clip_model(clip_dir, processor_path=str(root / "clip-processor"))
    tiny.save_tiny_clip_model(str(root / "clip-with-processor"), seed=1)  # like openai/clip-vit-large-patch14
    return {
        "tiny_clip_model": tiny.register_tiny_open_clip_config(),
        "hps": tiny.save_tiny_hps_checkpoint(str(root / "HPS_v2.1_compressed.pt")),
        "open_clip": _save_open_clip_weights(str(root / "open_clip_model.safetensors")),
        "clip": clip_dir,
        "clip_processor": str(root / "clip-processor"),
        "clip_with_processor": str(root / "clip-with-processor"),
        "aesthetic": tiny.save_tiny_aesthetic_checkpoint(str(root / "sac+logos+ava1-l14-linearMSE.pth")),
        "videoalign": tiny.save_tiny_videoalign(str(root / "videoalign")),
    }


def _save_open_clip_weights(path: str) -> str:
    """The tiny open_clip model as the LAION repositories hold it: `open_clip_model.safetensors`."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = open_clip.create_model(tiny.register_tiny_open_clip_config(), pretrained=None)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Direct computations with the underlying libraries


def open_clip_scores(model_name, state_dict, prompts, images, resize_mode) -> torch.Tensor:
    model = open_clip.create_model(model_name, pretrained=None)
    model.load_state_dict(state_dict)
    model.eval()
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    pixels = torch.stack([transform(to_pil(image)) for image in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(open_clip.get_tokenizer(model_name)(prompts), normalize=True)
    return (image_features * text_features).sum(-1)


def transformers_clip_embeddings(model_dir, processor_dir, prompts, images):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixel_values = CLIPImageProcessor.from_pretrained(processor_dir)(
        images=list(images), do_rescale=False, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values)
        image_embeds = image_embeds if isinstance(image_embeds, torch.Tensor) else image_embeds.pooler_output
        text_embeds = None
        if prompts is not None:
            tokens = AutoTokenizer.from_pretrained(processor_dir)(
                prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
            )
            text_embeds = model.get_text_features(**tokens)
            text_embeds = text_embeds if isinstance(text_embeds, torch.Tensor) else text_embeds.pooler_output
    return model, image_embeds, text_embeds


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing on tensors vs the libraries' PIL transforms


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("height, width", [(48, 40), (30, 64), (32, 32)])
def test_tensor_preprocessing_matches_open_clip_transforms(resize_mode, height, width):
    from trl_dancegrpo.rewards._preprocessing import preprocess

    images = uint8_images(2, 64, seed=7)[..., :height, :width]
    transform = open_clip.image_transform(32, is_train=False, resize_mode=resize_mode)
    expected = torch.stack([transform(to_pil(image)) for image in images])
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    pixels = preprocess(images, (32, 32), mean, std, resize_mode)
    assert pixels.shape == expected.shape
    difference = (pixels - expected).abs()
    if (height, width) == (32, 32):
        assert difference.max() < 1e-5  # at the input size: no resampling, exactly the library's pixels
    else:  # bicubic on tensors vs PIL's (uint8): a few levels of 255 apart, and never a misplaced crop or pad
        assert difference.mean() < 0.02 and difference.max() < 0.3


def test_tensor_preprocessing_matches_the_clip_image_processor():
    from transformers import CLIPImageProcessor

    from trl_dancegrpo.rewards._preprocessing import preprocess

    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    images = uint8_images(2, 64, seed=8)[..., :48, :60]
    expected = processor(images=[to_pil(image) for image in images], return_tensors="pt")["pixel_values"]
    pixels = preprocess(images, (32, 32), processor.image_mean, processor.image_std, "shortest", shortest_edge=40)
    difference = (pixels - expected).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.3


# --------------------------------------------------------------------------------------------------------------------
# HPS


def test_hps_matches_open_clip_through_the_hub_path(checkpoints, offline_hub):
    offline_hub("xswu/HPSv2", {"HPS_v2.1_compressed.pt": checkpoints["hps"]})
    images = uint8_images(3, 32)
    reward = get_reward("hpsv2.1", clip_model=checkpoints["tiny_clip_model"], device="cpu")
    scores = reward(PROMPTS, images)
    state_dict = torch.load(checkpoints["hps"], weights_only=True)["state_dict"]
    # HPS evaluates with open_clip's "longest" (fit and pad) transform.
    expected = open_clip_scores(checkpoints["tiny_clip_model"], state_dict, PROMPTS, images, resize_mode="longest")
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-4, rtol=0)


def test_hps_local_checkpoint_and_non_square_images(checkpoints):
    reward = HPSReward(checkpoint_path=checkpoints["hps"], clip_model=checkpoints["tiny_clip_model"], device="cpu")
    images = uint8_images(2, 48)[..., :40]  # 48 x 40: resized to fit 32 x 32, then padded
    state_dict = torch.load(checkpoints["hps"], weights_only=True)["state_dict"]
    expected = open_clip_scores(checkpoints["tiny_clip_model"], state_dict, PROMPTS[:2], images, resize_mode="longest")
    # Tensor bicubic resizing differs from PIL's by a few levels of 255: close, not equal.
    torch.testing.assert_close(torch.tensor(reward(PROMPTS[:2], images)), expected, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_pretrained_tag_matches_open_clip_through_the_hub_path(checkpoints, offline_hub, monkeypatch):
    from open_clip import pretrained

    # Register a pretrained tag for the tiny architecture, hosted like the LAION ones ("org/repo/" + default file).
    tags = {"tiny_tag": pretrained._pcfg(hf_hub="tiny-org/tiny-open-clip/")}
    monkeypatch.setitem(pretrained._PRETRAINED, checkpoints["tiny_clip_model"], tags)
    offline_hub("tiny-org/tiny-open-clip", {"open_clip_model.safetensors": checkpoints["open_clip"]})
    images = uint8_images(3, 32, seed=1)
    reward = CLIPScoreReward(clip_model=checkpoints["tiny_clip_model"], pretrained="tiny_tag", device="cpu")
    scores = reward(PROMPTS, images)
    from safetensors.torch import load_file

    state_dict = load_file(checkpoints["open_clip"])
    expected = open_clip_scores(checkpoints["tiny_clip_model"], state_dict, PROMPTS, images, resize_mode="shortest")
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-4, rtol=0)
    assert reward.__name__ == "clip_score"


def test_clip_score_from_a_local_file_center_crops(checkpoints):
    from safetensors.torch import load_file

    reward = CLIPScoreReward(
        clip_model=checkpoints["tiny_clip_model"], pretrained=checkpoints["open_clip"], device="cpu"
    )
    images = uint8_images(2, 48)[..., :40]
    state_dict = load_file(checkpoints["open_clip"])
    expected = open_clip_scores(
        checkpoints["tiny_clip_model"], state_dict, PROMPTS[:2], images, resize_mode="shortest"
    )
    torch.testing.assert_close(torch.tensor(reward(PROMPTS[:2], images)), expected, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        CLIPScoreReward(clip_model=checkpoints["tiny_clip_model"], pretrained="no_such_tag")(["a"], images[:1])


# --------------------------------------------------------------------------------------------------------------------
# PickScore


def test_pickscore_matches_transformers_through_the_hub_path(checkpoints, offline_hub):
    model_dir, processor_dir = checkpoints["clip"], checkpoints["clip_processor"]
    offline_hub("yuvalkirstain/PickScore_v1", {name: os.path.join(model_dir, name) for name in os.listdir(model_dir)})
    offline_hub(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        {name: os.path.join(processor_dir, name) for name in os.listdir(processor_dir)},
    )
    images = uint8_images(3, 32, seed=2)
    scores = get_reward("pickscore", device="cpu")(PROMPTS, images)
    model, image_embeds, text_embeds = transformers_clip_embeddings(model_dir, processor_dir, PROMPTS, images)
    cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    expected = model.logit_scale.exp() * cosine  # PickScore's definition
    torch.testing.assert_close(torch.tensor(scores), expected.detach(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Aesthetic


def test_aesthetic_matches_transformers_and_the_mlp_through_the_hub_path(checkpoints, offline_hub):
    clip_dir = checkpoints["clip_with_processor"]
    offline_hub("openai/clip-vit-large-patch14", {name: os.path.join(clip_dir, name) for name in os.listdir(clip_dir)})
    offline_hub(
        "camenduru/improved-aesthetic-predictor", {"sac+logos+ava1-l14-linearMSE.pth": checkpoints["aesthetic"]}
    )
    images = uint8_images(3, 32, seed=3)
    scores = get_reward("aesthetic", device="cpu")(None, images)
    _, image_embeds, _ = transformers_clip_embeddings(clip_dir, clip_dir, None, images)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in torch.load(checkpoints["aesthetic"]).items()})
    with torch.no_grad():
        expected = mlp.eval()(F.normalize(image_embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# All image rewards: invariance, lazy shared loading, dtype


def image_rewards(checkpoints, **kwargs):
    return {
        "hps": HPSReward(checkpoint_path=checkpoints["hps"], clip_model=checkpoints["tiny_clip_model"], **kwargs),
        "clip_score": CLIPScoreReward(checkpoints["tiny_clip_model"], checkpoints["open_clip"], **kwargs),
        "pickscore": PickScoreReward(checkpoints["clip"], checkpoints["clip_processor"], **kwargs),
        "aesthetic": AestheticReward(checkpoints["aesthetic"], checkpoints["clip_with_processor"], **kwargs),
    }


@pytest.mark.parametrize("name", ["hps", "clip_score", "pickscore", "aesthetic"])
def test_scores_do_not_depend_on_batch_size_or_order(checkpoints, name):
    images = uint8_images(3, 40, seed=4)  # not at the input size: resizing is batched too
    one_by_one = image_rewards(checkpoints, batch_size=1, device="cpu")[name](PROMPTS, images)
    batched = image_rewards(checkpoints, batch_size=3, device="cpu")[name](PROMPTS, images)
    order = [2, 0, 1]
    permuted = image_rewards(checkpoints, batch_size=2, device="cpu")[name]([PROMPTS[i] for i in order], images[order])
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one_by_one), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(permuted), torch.tensor(batched)[order], atol=1e-5, rtol=0)


def test_models_load_lazily_once_and_are_shared(checkpoints, monkeypatch):
    clear_model_cache()
    loads = []
    original = HPSReward._load

    def counting_load(self, device, dtype):
        loads.append((device, dtype))
        return original(self, device, dtype)

    monkeypatch.setattr(HPSReward, "_load", counting_load)
    reward = HPSReward(checkpoint_path=checkpoints["hps"], clip_model=checkpoints["tiny_clip_model"])
    reward.set_device("cpu", torch.float32)
    assert loads == []  # nothing is loaded before the first call
    images = uint8_images(2, 32)
    reward(PROMPTS[:2], images)
    reward(PROMPTS[:2], images)
    thresholded = BinaryReward(
        HPSReward(checkpoint_path=checkpoints["hps"], clip_model=checkpoints["tiny_clip_model"], device="cpu"), 0.0
    )
    thresholded(PROMPTS[:2], images)
    assert loads == [(torch.device("cpu"), torch.float32)]  # once, and shared with the second instance
    model = reward.loaded.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["hps", "pickscore", "aesthetic"])
def test_rewards_run_in_the_trainer_dtype(checkpoints, name):
    images = uint8_images(2, 32, seed=5)
    reference = image_rewards(checkpoints, device="cpu")[name](PROMPTS[:2], images)
    reward = image_rewards(checkpoints)[name]
    reward.set_device("cpu", torch.bfloat16)  # what the trainer does with bf16 training
    scores = reward(PROMPTS[:2], images)
    assert next(reward.loaded.model.parameters()).dtype == torch.bfloat16
    assert all(isinstance(score, float) for score in scores)
    torch.testing.assert_close(
        torch.tensor(scores), torch.tensor(reference), atol=0.1 * max(map(abs, reference)) + 0.02, rtol=0
    )


def test_binary_and_per_frame_wrap_model_rewards(checkpoints):
    aesthetic = AestheticReward(checkpoints["aesthetic"], checkpoints["clip_with_processor"], device="cpu")
    videos = uint8_images(6, 32, seed=6).unflatten(0, (2, 3))  # 2 videos of 3 frames
    per_video = per_frame(aesthetic)(None, videos)
    per_image = aesthetic(None, videos.flatten(0, 1))
    assert per_video == pytest.approx([sum(per_image[:3]) / 3, sum(per_image[3:]) / 3], abs=1e-6)
    threshold = sum(per_image) / len(per_image)
    assert BinaryReward(aesthetic, threshold)(None, videos[0]) == [float(s > threshold) for s in per_image[:3]]


# --------------------------------------------------------------------------------------------------------------------
# VideoAlign


def videoalign_direct(prompts, videos) -> torch.Tensor:
    """(VQ, MQ, TA), standardised, from the PEFT-wrapped tiny model the checkpoint was saved from (LoRA unmerged)."""
    from trl_dancegrpo.rewards.video import REWARD_TOKENS, build_videoalign_prompt

    peft_model, processor = tiny.tiny_videoalign_model(seed=0)
    chats = [
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_videoalign_prompt(p)}]}]
        for p in prompts
    ]
    processor.tokenizer.padding_side = "right"
    inputs = processor(
        text=processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True),
        videos=list(videos),
        padding=True,
        return_tensors="pt",
        videos_kwargs={"do_rescale": False, "do_resize": False},
    )
    reward_model = peft_model.base_model.model
    with torch.no_grad():
        hidden = reward_model.model(**inputs).last_hidden_state
        per_token = reward_model.rm_head(hidden)[..., 0]
    token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    raw = torch.stack([per_token[inputs["input_ids"] == token_id] for token_id in token_ids], dim=1)
    mean = torch.tensor([3.6757, 1.1646, 2.8105])
    std = torch.tensor([2.2476, 1.3811, 2.5121])
    return (raw - mean) / std


def tiny_videos(num: int, seed: int = 0) -> torch.Tensor:
    size = tiny.TINY_VIDEOALIGN_FRAME_SIZE  # already on the tiny model's patch grid: no resizing
    return torch.rand(num, 4, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_videoalign_matches_the_peft_model_through_the_hub_path(checkpoints, offline_hub):
    reward_dir = checkpoints["videoalign"]
    files = {"model_config.json": os.path.join(reward_dir, "model_config.json")}
    files["checkpoint-2/model.pth"] = os.path.join(reward_dir, "checkpoint-2", "model.pth")
    offline_hub("KwaiVGI/VideoReward", files)
    prompts, videos = ["a cat walks", "a car drives"], tiny_videos(2)
    expected = videoalign_direct(prompts, videos)
    rewards = [get_reward(name, device="cpu") for name in ("videoalign_vq", "videoalign_mq", "videoalign_ta")]
    scores = torch.tensor([reward(prompts, videos) for reward in rewards]).T
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert rewards[0].loaded is rewards[1].loaded is rewards[2].loaded  # one loaded model for the three


@pytest.mark.slow
def test_videoalign_runs_the_model_once_for_its_three_scores(checkpoints):
    rewards = [VideoAlignReward(d, checkpoints["videoalign"], device="cpu") for d in ("VQ", "MQ", "TA")]
    forwards = []
    handle = rewards[0].loaded.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        prompts, videos = ["a cat walks", "a car drives"], tiny_videos(2, seed=1)
        for reward in rewards:
            reward(prompts, videos)
        assert len(forwards) == 1
        videos.mul_(0.5)  # the same tensor, changed in place: scored again
        rewards[0](prompts, videos)
        rewards[1](prompts, videos.clone())  # another tensor: scored again
        assert len(forwards) == 3
    finally:
        handle.remove()


@pytest.mark.slow
def test_videoalign_batch_size_order_and_unnormalised_scores(checkpoints):
    prompts, videos = ["a cat walks", "a car drives", "a dog runs"], tiny_videos(3, seed=2)
    one_by_one = VideoAlignReward("TA", checkpoints["videoalign"], device="cpu", batch_size=1)(prompts, videos)
    batched = VideoAlignReward("TA", checkpoints["videoalign"], device="cpu", batch_size=3)(prompts, videos)
    order = [2, 0, 1]
    permuted = VideoAlignReward("TA", checkpoints["videoalign"], device="cpu", batch_size=2)(
        [prompts[i] for i in order], videos[order]
    )
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(one_by_one), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(permuted), torch.tensor(batched)[order], atol=1e-5, rtol=0)
    raw = VideoAlignReward("TA", checkpoints["videoalign"], device="cpu", normalize=False)(prompts, videos)
    torch.testing.assert_close(torch.tensor(batched), (torch.tensor(raw) - 2.8105) / 2.5121, atol=1e-5, rtol=0)


def test_videoalign_samples_and_resizes_frames_like_videoalign(checkpoints):
    from trl_dancegrpo.rewards.video import sample_frame_indices

    # 53 frames at 24 fps seen at 2 fps: 4 frames (the minimum), spread over the whole video.
    assert sample_frame_indices(53, video_fps=24, sample_fps=2) == [0, 17, 35, 52]
    assert sample_frame_indices(240, video_fps=24, sample_fps=2) == torch.linspace(0, 239, 20).round().long().tolist()
    assert sample_frame_indices(9, video_fps=24, sample_fps=2, num_frames=6) == [0, 2, 3, 5, 6, 8]
    assert len(sample_frame_indices(9, video_fps=24, sample_fps=2, num_frames=5)) == 4  # even, as qwen-vl-utils
    assert sample_frame_indices(1, video_fps=24, sample_fps=2) == [0]
    reward = VideoAlignReward("MQ", checkpoints["videoalign"], device="cpu", num_frames=2)
    videos = torch.rand(1, 6, 3, 50, 70)  # resized on the device to the tiny model's 8-pixel grid
    frames = reward._frames(reward.loaded, videos)
    assert frames[0].shape == (2, 3, 80, 112)  # Qwen2-VL's smart_resize: >= 128 merged patches
    assert len(reward(["a cat"], videos)) == 1


def test_videoalign_in_bfloat16(checkpoints):
    prompts, videos = ["a cat walks"], tiny_videos(1, seed=3)
    reference = VideoAlignReward("VQ", checkpoints["videoalign"], device="cpu")(prompts, videos)
    reward = VideoAlignReward("VQ", checkpoints["videoalign"])
    reward.set_device("cpu", torch.bfloat16)
    scores = reward(prompts, videos)
    assert next(reward.loaded.model.parameters()).dtype == torch.bfloat16
    assert scores == pytest.approx(reference, abs=0.1)
