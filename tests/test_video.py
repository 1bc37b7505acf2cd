"""Video pipelines end to end on tiny models loaded from disk: HunyuanVideo and Wan text-to-video, SkyReels and Wan
image-to-video (32x32 px, 5 frames = 2 latent frames)."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_dancegrpo.rewards import brightness, per_frame

from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_trainer,
    snapshot_parameters,
)


VIDEO_PIPELINES = ["tiny-hunyuan-video", "tiny-skyreels", "tiny-wan", "tiny-wan-i2v"]
I2V_PIPELINES = ["tiny-skyreels", "tiny-wan-i2v"]
PROMPTS = ["a cat", "a dog", "a car", "a tree"]
COLORS = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (240, 240, 240)]


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny models' matmuls are far faster on one thread, and two threads crawl when another process is busy
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def solid(color, size=32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def video_dataset(name, prompts=PROMPTS, **columns) -> Dataset:
    rows = {"prompt": list(prompts), **columns}
    if name in I2V_PIPELINES and "image" not in rows:
        rows["image"] = [solid(COLORS[i % len(COLORS)]) for i in range(len(prompts))]
    return Dataset.from_dict(rows)


def make_video_trainer(name, tiny_pipeline_path, tmp_path, dataset=None, **overrides):
    overrides.setdefault("num_frames", 5)
    dataset = dataset if dataset is not None else video_dataset(name)
    return make_trainer(tiny_pipeline_path(name), tmp_path, dataset=dataset, **overrides)


@pytest.mark.parametrize("name", VIDEO_PIPELINES)
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config() if use_lora else None)
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    assert all("lora" in n for n in before["trainable"]) if use_lora else not before["frozen"]
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    first = trainer.state.log_history[0]
    assert first["ratio/min"] == pytest.approx(1, abs=1e-6) and first["ratio/max"] == pytest.approx(1, abs=1e-6)
    for key in ("rewards/brightness/mean", "advantages/std", "approx_kl", "grad_norm", "loss"):
        assert math.isfinite(first[key]), key


@pytest.mark.parametrize("name", VIDEO_PIPELINES)
def test_ratio_is_one_at_the_first_inner_step(name, tiny_pipeline_path, tmp_path):
    # slices of 2 in a batch of 8 (CFG doubles them for SkyReels and Wan): the loss must re-score each sample in the
    # batch it was sampled in
    trainer = make_video_trainer(
        name, tiny_pipeline_path, tmp_path, max_steps=1, rollout_batch_size=2, learning_rate=1.0
    )
    assert trainer.adapter.use_cfg == (name != "tiny-hunyuan-video")
    trainer.train()
    assert_first_step_on_policy(trainer)


def pipeline_call(name, trainer):
    call = dict(
        prompt="a blue house",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        output_type="pt",
        max_sequence_length=16,
    )
    if name in I2V_PIPELINES:
        call["image"] = solid((200, 120, 20))
    return call


@pytest.mark.parametrize("name", VIDEO_PIPELINES)
def test_lora_round_trip_through_load_lora_weights(name, tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(name)
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    trained = assert_lora_round_trip(trainer, path, tmp_path / "lora", pipeline_call(name, trainer), output="frames")
    assert trained.shape == (1, 5, 3, 32, 32)


def test_rewards_get_whole_clips_and_image_rewards_apply_per_frame(tiny_pipeline_path, tmp_path):
    seen = {}

    def clip_reward(prompts, images, **kwargs):
        seen["clip"] = images.shape
        assert images.min() >= 0 and images.max() <= 1
        return images[:, -1].flatten(1).mean(1).tolist()  # brightness of the last frame

    def image_brightness(prompts, images, **kwargs):
        seen["frames"] = images.shape
        return brightness(prompts, images)

    trainer = make_video_trainer(
        "tiny-hunyuan-video",
        tiny_pipeline_path,
        tmp_path,
        reward=[clip_reward, per_frame(image_brightness, name="frame_brightness")],
        max_steps=1,
    )
    trainer.train()
    assert seen["clip"] == (8, 5, 3, 32, 32)  # (N, F, 3, H, W)
    assert seen["frames"] == (40, 3, 32, 32)  # every frame of every video, scored as an image
    videos, _ = trainer.generate(["a cat", "a dog"], seed=1)
    frame_means = per_frame(brightness)(["a cat", "a dog"], videos)
    assert frame_means == pytest.approx(videos.flatten(1).mean(1).tolist(), abs=1e-6)  # the mean over frames


@pytest.mark.parametrize("name", VIDEO_PIPELINES)
def test_guidance_per_family(name, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path, max_steps=1)
    expected = {  # HunyuanVideo: embedded (diffusers' default); SkyReels: true CFG 6; Wan: CFG 5
        "tiny-hunyuan-video": (6.0, False, 6000.0),
        "tiny-skyreels": (6.0, True, 1000.0),
        "tiny-wan": (5.0, True, None),
        "tiny-wan-i2v": (5.0, True, None),
    }[name]
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs.get("guidance"))),
        with_kwargs=True,
    )
    trainer.train()
    assert (trainer.adapter.guidance_scale, trainer.adapter.use_cfg) == expected[:2]
    # CFG: both branches in one forward of 2 x 8 rows, in the rollout (4 steps) and in the loss (int(0.6 * 3) = 1)
    assert [rows for rows, _ in seen] == [16 if expected[1] else 8] * 5
    if expected[2] is None:
        assert all(guidance is None for _, guidance in seen)
    else:
        assert all(torch.all(guidance == expected[2]) for _, guidance in seen)
    # the model card's pipeline call (its guidance arguments) guides as training did: SkyReels' true CFG runs only
    # with a negative prompt, and its `guidance_scale` is the guidance embedding's
    pipeline = trainer.adapter.pipeline
    seen.clear()
    with torch.no_grad():
        pipeline(**pipeline_call(name, trainer), **trainer.adapter.pipeline_guidance_arguments())
    assert len(seen) == 2 * (2 if expected[1] else 1)  # 2 steps; the pipelines call the branches one at a time
    if expected[2] is not None:
        assert all(torch.all(guidance == expected[2]) for _, guidance in seen)


def test_hunyuan_embedded_guidance_is_computed_as_diffusers_does(tiny_pipeline_path, tmp_path):
    adapter = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path).adapter
    latents = torch.zeros(2, 1)
    assert torch.all(adapter.guidance(latents) == 6000.0)  # float32 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guidance = adapter.guidance(latents)
    # HunyuanVideoPipeline: tensor(6.0, transformer dtype) * 1000 -> bf16 6016, what the bf16 model and DanceGRPO see
    assert guidance.dtype == torch.bfloat16 and torch.all(guidance.float() == 6016.0)


def test_hunyuan_prompt_template_is_cropped_and_prompts_matter(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path)
    adapter = trainer.adapter
    cond = adapter.encode_prompts(["a cat", "a dog"])
    assert cond["prompt_embeds"].shape[1] == 16  # the prompt tokens only: the system template's are cropped
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    template = adapter.prompt_template
    prefix_ids = adapter.pipeline.tokenizer(template["template"].split("{}")[0])["input_ids"]
    full_ids = adapter.pipeline.tokenizer(template["template"].format("a cat"))["input_ids"]
    assert full_ids[: template["crop_start"]] == prefix_ids and full_ids[template["crop_start"]] != prefix_ids[-1]


@pytest.mark.parametrize("name", ["tiny-hunyuan-video", "tiny-wan"])
def test_num_frames_must_fit_the_vae(name, tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames = 1 \+ 4 \* k.*got 6; use e.g. 5 or 9"):
        make_video_trainer(name, tiny_pipeline_path, tmp_path, num_frames=6)
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path, num_frames=9)
    videos, trajectory = trainer.generate(["a cat"])
    assert videos.shape == (1, 9, 3, 32, 32) and trajectory.latents.shape[3] == 3  # 1 + 8 / 4 latent frames


def test_num_frames_is_refused_for_an_image_model(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="generates images; leave num_frames unset"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, num_frames=5)


# -- image-to-video ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", I2V_PIPELINES)
def test_the_conditioning_image_reaches_the_model(name, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path)
    red, blue = solid((230, 20, 20)), solid((20, 20, 230))
    prompts = ["a cat", "a cat"]
    videos, _ = trainer.generate(prompts, seed=3, images=[red, blue], group_size=2)  # one initial noise
    same, _ = trainer.generate(prompts, seed=3, images=[red, red], group_size=2)
    assert (videos[0] - videos[1]).abs().max() > 1e-3  # same prompt and noise, other image: other video
    torch.testing.assert_close(same[0], same[1])  # same image: same video (deterministic sampling)
    torch.testing.assert_close(videos[0], same[0])


@pytest.mark.parametrize("name", I2V_PIPELINES)
def test_images_as_paths_tensors_and_pil_are_the_same(name, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path)
    image = Image.effect_mandelbrot((40, 48), (-2, -1.2, 0.8, 1.2), 40).convert("RGB")  # not the training size
    image.save(tmp_path / "image.png")
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    videos = [trainer.generate(["a cat"], seed=0, images=[x])[0] for x in (image, str(tmp_path / "image.png"), tensor)]
    torch.testing.assert_close(videos[0], videos[1])
    torch.testing.assert_close(videos[0], videos[2])


def test_prompt_and_image_pairs_are_encoded_once(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer("tiny-skyreels", tiny_pipeline_path, tmp_path)
    calls = []
    encode = trainer.adapter.encode_images
    trainer.adapter.encode_images = lambda images: calls.append(len(images)) or encode(images)
    # 8 rows, decoded separately (distinct objects): 2 prompts x 2 images, as rows of a group arrive
    prompts = ["a cat"] * 2 + ["a dog"] * 2 + ["a cat"] * 2 + ["a dog"] * 2
    images = [solid(COLORS[i // 4]) for i in range(8)]
    cond, _ = trainer._conditioning(prompts, images)
    assert calls == [4]  # (cat, red), (dog, red), (cat, green), (dog, green)
    latents = cond["image_latents"]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    assert not torch.equal(latents[0], latents[4])


class FollowTheImage(torch.nn.Module):
    """A denoiser built to reproduce its conditioning: it predicts x0 = the image latents in its input channels, so the
    deterministic sampler ends exactly on them (first frame: the image; later frames: what the model family puts
    there). `offset` skips the mask channels of Wan's conditioning."""

    def __init__(self, channels: int, offset: int = 0):
        super().__init__()
        self.channels, self.offset = channels, offset

    def forward(self, hidden_states, timestep, **kwargs):
        x = hidden_states[:, : self.channels]
        target = hidden_states[:, self.channels + self.offset : 2 * self.channels + self.offset]
        sigma = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
        return ((x - target) / sigma,)  # velocity v with x - sigma * v = target


@pytest.mark.parametrize("name", I2V_PIPELINES)
def test_first_frame_follows_the_image_when_the_model_is_built_to(name, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(name, tiny_pipeline_path, tmp_path, guidance_scale=1.0)
    adapter, pipeline = trainer.adapter, trainer.pipeline
    channels = adapter.latent_channels
    trainer.model = FollowTheImage(channels, offset=4 if name == "tiny-wan-i2v" else 0)
    image = Image.effect_mandelbrot((32, 32), (-2, -1.2, 0.8, 1.2), 40).convert("RGB")
    videos, trajectory = trainer.generate(["a cat"], seed=0, images=[image])

    # the image's latents, computed here from the VAE directly
    pixels = pipeline.video_processor.preprocess(image, height=32, width=32).unsqueeze(2)
    encoded = pipeline.vae.encode(pixels).latent_dist.mode()
    if name == "tiny-wan-i2v":
        mean, std = adapter._latent_statistics(encoded)
        expected = (encoded - mean) / std
    else:
        expected = encoded * pipeline.vae.config.scaling_factor
    torch.testing.assert_close(trajectory.final_latents[:, :, :1], expected, rtol=1e-4, atol=1e-4)
    _, other = trainer.generate(["a cat"], seed=0, images=[solid((0, 0, 0))])
    assert (other.final_latents[:, :, 0] - trajectory.final_latents[:, :, 0]).abs().mean() > 1e-3
    # (in pixels, the first frame is then the VAE's reconstruction of the image: with the random tiny VAEs that is
    # not the image itself, so the test stops at the latents)
    assert videos.shape == (1, 5, 3, 32, 32)


def test_missing_image_column_or_entries_are_clear_errors(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="image-to-video: train_dataset needs an 'image' column"):
        make_video_trainer(
            "tiny-skyreels", tiny_pipeline_path, tmp_path, dataset=Dataset.from_dict({"prompt": PROMPTS})
        )
    images = [solid(c) for c in COLORS]
    images[2] = None
    with pytest.raises(ValueError, match="Row 2 of train_dataset has no image"):
        make_video_trainer("tiny-skyreels", tiny_pipeline_path, tmp_path, dataset=video_dataset("", image=images))
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    for path, color in zip(paths, COLORS):
        solid(color).save(path)
    paths[1] = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"Row 1 of train_dataset: the image file .*missing.png' does not exist"):
        make_video_trainer("tiny-skyreels", tiny_pipeline_path, tmp_path, dataset=video_dataset("", image=paths))


def test_unreadable_image_names_the_row(tiny_pipeline_path, tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    for path, color in zip(paths, COLORS):
        solid(color).save(path)
    (tmp_path / "3.png").write_bytes(b"not a png")
    dataset = video_dataset("", prompts=PROMPTS, image=paths)
    trainer = make_video_trainer("tiny-skyreels", tiny_pipeline_path, tmp_path, dataset=dataset, shuffle_dataset=False)
    with pytest.raises(
        ValueError, match=r"Sample \d+ of the batch \(prompt 'a tree'\): the image '.*3.png' could not"
    ):
        trainer.train()
