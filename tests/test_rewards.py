"""Tests of the reward registry, the weight-free rewards, the wrappers, input checks and offline/safe loading.

The model rewards' scores against direct computations with open_clip / transformers are in `test_rewards_models.py`.
"""

import asyncio
import io
import os
import re
import socket

import pytest
import torch
from PIL import Image

from trl_dancegrpo.rewards import (
    REWARD_REGISTRY,
    AestheticReward,
    BinaryReward,
    CLIPScoreReward,
    HPSReward,
    PerFrameReward,
    PickScoreReward,
    RewardModelNotFoundError,
    VideoAlignReward,
    brightness,
    get_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    per_frame,
    register_reward,
)


PAPER_REWARDS = [
    "hpsv2.1",
    "hpsv2",
    "clip_score",
    "pickscore",
    "aesthetic",
    "videoalign_vq",
    "videoalign_mq",
    "videoalign_ta",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "brightness",
]


# --------------------------------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("name", PAPER_REWARDS)
def test_registry_gives_each_reward_under_its_logged_name(name):
    reward = get_reward(name)
    assert callable(reward)
    # The trainer logs callables by `__name__`: a reward got by name must be logged under that same name.
    assert reward.__name__ == name


def test_registry_classes_and_arguments():
    assert isinstance(get_reward("hpsv2.1"), HPSReward) and get_reward("hpsv2.1").version == "v2.1"
    assert get_reward("hpsv2").version == "v2.0"
    assert isinstance(get_reward("clip_score"), CLIPScoreReward)
    assert isinstance(get_reward("pickscore"), PickScoreReward)
    assert isinstance(get_reward("aesthetic"), AestheticReward)
    assert [get_reward(f"videoalign_{d}").dimension for d in ("vq", "mq", "ta")] == ["VQ", "MQ", "TA"]
    reward = get_reward("hpsv2.1", checkpoint_path="some/file.pt", batch_size=3)
    assert (reward.checkpoint_path, reward.batch_size) == ("some/file.pt", 3)
    with pytest.raises(ValueError, match="takes no arguments"):
        get_reward("brightness", threshold=1)


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown reward 'hps_v3'") as error:
        get_reward("hps_v3")
    for name in PAPER_REWARDS:
        assert name in str(error.value)


def test_dotted_import_paths():
    assert get_reward("trl_dancegrpo.rewards.brightness") is brightness
    reward = get_reward("trl_dancegrpo.rewards.HPSReward", version="v2.0")  # classes are instantiated with kwargs
    assert isinstance(reward, HPSReward) and reward.__name__ == "hpsv2"
    with pytest.raises(ValueError, match="Could not import"):
        get_reward("trl_dancegrpo.rewards.no_such_reward")


@pytest.mark.parametrize(
    "name, suggestion",
    [("HPSv3", "'hpsv3'"), ("HPSv2.1", "'hpsv2.1'"), ("Brightness", "'brightness'"), ("hpsv2.2", "'hpsv2.1'")],
)
def test_get_reward_suggests_registered_names_case_insensitively(name, suggestion):
    with pytest.raises(ValueError, match=f"Unknown reward '{re.escape(name)}'. Did you mean {suggestion}"):
        get_reward(name)


def test_a_missing_import_path_is_named_as_one():
    with pytest.raises(ValueError, match="the module 'no_such_package' of that import path cannot be found"):
        get_reward("no_such_package.my_reward")


def test_register_reward(monkeypatch):
    monkeypatch.setattr("trl_dancegrpo.rewards.registry.REWARD_REGISTRY", dict(REWARD_REGISTRY))

    def darkness(prompts, images, **kwargs):
        return [1 - value for value in brightness(prompts, images)]

    register_reward("darkness", lambda: darkness)
    assert get_reward("darkness") is darkness
    with pytest.raises(ValueError, match="already registered"):
        register_reward("darkness", lambda: darkness)


# --------------------------------------------------------------------------------------------------------------------
# Weight-free rewards


def test_brightness():
    images = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.25), torch.ones(3, 8, 8)])
    assert brightness(["a"] * 3, images) == pytest.approx([0.0, 0.25, 1.0])


def test_jpeg_rewards_are_the_jpeg_size_in_kilobytes():
    torch.manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32)])
    expected = []
    for image in images:
        buffer = io.BytesIO()
        array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    assert jpeg_incompressibility(["a", "b"], images, extra_column=[1, 2]) == pytest.approx(expected)
    assert jpeg_compressibility(["a", "b"], images) == pytest.approx([-size for size in expected])
    assert expected[0] < expected[1]  # a flat image compresses better than noise


# --------------------------------------------------------------------------------------------------------------------
# Input checks: clear errors, before any model is loaded (these rewards have no weights here)

INPUT_ERRORS = [
    ([[0.5]], "must be a torch.Tensor"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float tensor"),
    (torch.zeros(2, 8, 8, 3), "3 RGB channels"),
    (torch.zeros(2, 8, 8), r"shape \(N, 3, H, W\)"),
    (torch.full((2, 3, 8, 8), -0.5), r"values in \[0, 1\].*\(images \+ 1\) / 2"),
    (torch.full((2, 3, 8, 8), 255.0), r"values in \[0, 1\]"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
]


@pytest.mark.parametrize(
    "reward",
    [HPSReward(), CLIPScoreReward(), PickScoreReward(), AestheticReward(), jpeg_compressibility],
    ids=["hps", "clip_score", "pickscore", "aesthetic", "jpeg"],
)
@pytest.mark.parametrize("images, message", INPUT_ERRORS)
def test_image_rewards_reject_bad_images(reward, images, message):
    with pytest.raises(ValueError, match=message):
        reward(["a cat", "a dog"], images)
    if hasattr(reward, "_loaded"):
        assert reward._loaded is None  # nothing was loaded


@pytest.mark.parametrize("reward", [HPSReward(), AestheticReward()], ids=["hps", "aesthetic"])
def test_image_rewards_refuse_videos_and_point_to_per_frame(reward):
    with pytest.raises(ValueError, match=r"per_frame\(reward\)"):
        reward(["a", "b"], torch.rand(2, 4, 3, 8, 8))


def test_text_rewards_need_one_prompt_per_image():
    with pytest.raises(ValueError, match="got 1 prompts for 2 images"):
        HPSReward()(["a cat"], torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="list of strings"):
        PickScoreReward()("a cat", torch.rand(1, 3, 8, 8))


def test_video_rewards_need_videos():
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        VideoAlignReward()(["a", "b"], torch.rand(2, 3, 8, 8))


def test_values_a_hair_outside_the_range_are_rounding_not_errors():
    images = torch.rand(2, 3, 8, 8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -1e-4, 1 + 1e-4
    assert len(jpeg_compressibility(["a", "b"], images)) == 2


def test_model_rewards_check_their_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        HPSReward(batch_size=0)
    with pytest.raises(ValueError, match="version"):
        HPSReward(version="v3")
    with pytest.raises(ValueError, match="resize_mode"):
        CLIPScoreReward(resize_mode="stretch")
    with pytest.raises(ValueError, match="dtype"):
        PickScoreReward(dtype="float8")
    with pytest.raises(ValueError, match="dimension"):
        VideoAlignReward(dimension="AQ")


# --------------------------------------------------------------------------------------------------------------------
# Device and dtype


def test_device_and_dtype_follow_the_trainer_unless_given():
    reward = HPSReward()
    reward.set_device("cpu", torch.bfloat16)
    assert (reward.device, reward.dtype) == (torch.device("cpu"), torch.bfloat16)
    explicit = HPSReward(device="meta", dtype="float16")
    explicit.set_device("cpu", torch.bfloat16)
    assert (explicit.device, explicit.dtype) == (torch.device("meta"), torch.float16)
    assert HPSReward().dtype == torch.float32


# --------------------------------------------------------------------------------------------------------------------
# Wrappers


def _constant_reward(values):
    def constant(prompts, images, **kwargs):
        return list(values)

    return constant


def test_binary_reward_thresholds():
    reward = BinaryReward(_constant_reward([0.1, 0.3, 0.5, None]), threshold=0.3)
    assert reward(["a"] * 4, torch.rand(4, 3, 8, 8)) == [0.0, 0.0, 1.0, None]  # strictly above
    assert reward.__name__ == "constant_binary"
    assert BinaryReward("brightness", 0.5).__name__ == "brightness_binary"
    assert BinaryReward(brightness, 0.5, name="bright")(
        ["a", "b"], torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    ) == [
        0.0,
        1.0,
    ]


def test_binary_reward_forwards_the_trainer_device():
    inner = HPSReward()
    BinaryReward(inner, 0.3).set_device("cpu", torch.float16)
    assert inner.dtype == torch.float16


def test_wrappers_of_async_rewards_are_awaitable():
    async def remote_score(prompts, images, **kwargs):
        await asyncio.sleep(0)
        return [0.2, 0.8]

    result = BinaryReward(remote_score, 0.5)(["a", "b"], torch.rand(2, 3, 8, 8))
    assert asyncio.iscoroutine(result)
    assert asyncio.run(result) == [0.0, 1.0]

    async def per_frame_score(prompts, images, **kwargs):
        return images.flatten(1).mean(1).tolist()

    videos = torch.rand(2, 3, 3, 4, 4)
    result = per_frame(per_frame_score)(["a", "b"], videos)
    assert asyncio.run(result) == pytest.approx(videos.flatten(2).mean(2).mean(1).tolist())


def test_per_frame_reward_scores_every_frame_with_its_video_prompt_and_columns():
    calls = []

    def recording(prompts, images, **kwargs):
        calls.append((prompts, images.shape, kwargs))
        return [float(image.mean()) if prompt != "skip" else None for prompt, image in zip(prompts, images)]

    videos = torch.rand(2, 3, 3, 4, 4)
    scores = PerFrameReward(recording)(["a cat", "skip"], videos, style=["photo", "anime"], seed=7)
    prompts, shape, kwargs = calls[0]
    assert prompts == ["a cat"] * 3 + ["skip"] * 3
    assert shape == (6, 3, 4, 4)
    assert kwargs == {"style": ["photo"] * 3 + ["anime"] * 3, "seed": 7}
    assert scores[0] == pytest.approx(videos[0].mean().item(), abs=1e-6)
    assert scores[1] is None  # every frame was "not applicable"

    images = torch.rand(2, 3, 4, 4)  # images pass through unchanged
    assert per_frame(recording)(["a", "b"], images) == pytest.approx(images.flatten(1).mean(1).tolist())
    assert per_frame(recording).__name__ == "recording"


def test_per_frame_ignores_frames_scored_none():
    def every_other(prompts, images, **kwargs):
        return [1.0 if i % 2 else None for i in range(len(images))]

    assert per_frame(every_other)(["a"], torch.rand(1, 4, 3, 2, 2)) == [1.0]


# --------------------------------------------------------------------------------------------------------------------
# Loading safely and offline


def _go_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


OFFLINE_CASES = [
    ("hpsv2.1", "xswu/HPSv2", "HPS_v2.1_compressed.pt", "checkpoint_path"),
    ("hpsv2", "xswu/HPSv2", "HPS_v2_compressed.pt", "checkpoint_path"),
    ("clip_score", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_model.safetensors", "pretrained"),
    ("pickscore", "yuvalkirstain/PickScore_v1", "*.safetensors", "model_name_or_path"),
    ("aesthetic", "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth", "checkpoint_path"),
    ("videoalign_mq", "KwaiVGI/VideoReward", "checkpoint-*/model.pth", "model_name_or_path"),
]


@pytest.mark.parametrize("name, repo_id, filename, argument", OFFLINE_CASES)
def test_offline_missing_weights_give_one_clear_error_at_once(
    monkeypatch, tmp_path, name, repo_id, filename, argument
):
    _go_offline(monkeypatch, tmp_path)
    reward = get_reward(name, device="cpu")
    images = torch.rand(1, 2, 3, 8, 8) if name.startswith("videoalign") else torch.rand(1, 3, 8, 8)
    connections = []  # "at once": no connection is even attempted (nothing to wait for), whatever the machine's load
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connections.append(address))
    with pytest.raises(RewardModelNotFoundError) as error:
        reward(["a cat"], images)
    assert connections == []
    message = str(error.value)
    assert repo_id in message and filename in message and f"`{argument}=" in message
    assert "HF_HUB_OFFLINE" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # not a huggingface_hub traceback
    assert isinstance(error.value, OSError)


def test_without_network_the_error_is_immediate_too(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    lookups = []

    def no_dns(*args, **kwargs):
        lookups.append(args[0])
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(RewardModelNotFoundError, match="cannot be resolved.*checkpoint_path=") as error:
        AestheticReward(device="cpu")(None, torch.rand(1, 3, 8, 8))
    # immediate: the host is looked up for the file's one request (twice, as huggingface_hub does), never retried
    assert lookups == ["huggingface.co"] * len(lookups) and len(lookups) <= 2, lookups
    assert "camenduru/improved-aesthetic-predictor" in str(error.value)


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        HPSReward(checkpoint_path="/nonexistent/HPS_v2.1_compressed.pt", device="cpu")(["a"], torch.rand(1, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        PickScoreReward(model_name_or_path="/nonexistent/pickscore", device="cpu")(["a"], torch.rand(1, 3, 8, 8))


class _Payload:
    """Stands for an arbitrary object in a malicious pickle."""


def test_checkpoints_are_never_unpickled_beyond_tensors(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.ones(())}, "payload": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        HPSReward(checkpoint_path=str(path), device="cpu")(["a"], torch.rand(1, 3, 8, 8))
    with pytest.raises(pickle.UnpicklingError):
        AestheticReward(checkpoint_path=str(path), device="cpu")(None, torch.rand(1, 3, 8, 8))


def test_no_reward_trusts_remote_code():
    import trl_dancegrpo.rewards as rewards_package

    folder = os.path.dirname(rewards_package.__file__)
    for filename in os.listdir(folder):
        if filename.endswith(".py"):
            with open(os.path.join(folder, filename)) as f:
                assert "trust_remote_code=True" not in f.read(), filename
