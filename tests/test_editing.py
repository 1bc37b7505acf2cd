"""Instruction-based editing end to end on tiny models loaded from disk: Qwen-Image-Edit, Qwen-Image-Edit-Plus and
FLUX.1 Kontext (32x32 px). The dataset's `image` column holds the source images."""

import contextlib
import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from PIL import Image

from trl_dancegrpo import DanceGRPOTrainer
from trl_dancegrpo.rewards import brightness
from trl_dancegrpo.video import image_to_tensor

from .test_hub import grid_tiles
from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_config,
    make_trainer,
    snapshot_parameters,
)
from .test_video import one_thread  # noqa: F401 (fixture)


EDIT_PIPELINES = ["tiny-qwen-image-edit", "tiny-qwen-image-edit-plus", "tiny-flux-kontext"]
QWEN_EDIT_PIPELINES = ["tiny-qwen-image-edit", "tiny-qwen-image-edit-plus"]
INSTRUCTIONS = ["make it red", "add a hat", "turn it to night", "make it brighter"]
COLORS = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (240, 240, 240)]


def source(index: int, size=(40, 32)) -> Image.Image:
    """A source image (not the training size): a colour with a gradient, so that its content matters."""
    gradient = np.linspace(0.3, 1.0, size[0])[None, :, None]
    return Image.fromarray(
        (np.array(COLORS[index % len(COLORS)])[None, None] * gradient).astype(np.uint8).repeat(size[1], 0)
    )


def edit_dataset(prompts=INSTRUCTIONS, images=None) -> Dataset:
    images = images if images is not None else [source(i) for i in range(len(prompts))]
    return Dataset.from_dict({"prompt": list(prompts), "image": images})


def make_edit_trainer(name, tiny_pipeline_path, tmp_path, dataset=None, **overrides):
    dataset = dataset if dataset is not None else edit_dataset()
    return make_trainer(tiny_pipeline_path(name), tmp_path, dataset=dataset, **overrides)


@contextlib.contextmanager
def pipeline_sources_at(size: int):
    """The Qwen-Image-Edit pipelines resize every source to about 1024x1024 (minutes for a tiny VAE on a CPU, and not
    the trainer's size): make them use `size` x `size` (their own code otherwise)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    original = pipeline_qwenimage_edit.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: original(size * size, ratio)
        )
        patch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", size * size)
        yield


def pipeline_call(name, trainer, image, **kwargs) -> dict:
    call = dict(image=image, prompt="make it blue", height=32, width=32, num_inference_steps=3, output_type="pt")
    call.update(trainer.adapter.pipeline_guidance_arguments())
    if name == "tiny-flux-kontext":
        # Kontext's own switches for the source's size; the tiny T5 tokenizer's 32 tokens, as the adapter uses
        call.update(max_area=32 * 32, _auto_resize=False, max_sequence_length=32)
    call.update(kwargs)
    return call


@pytest.mark.parametrize("name", EDIT_PIPELINES)
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config() if use_lora else None)
    assert trainer.adapter.task == "image-to-image" and trainer.adapter.requires_image
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    assert all("lora" in n for n in before["trainable"]) or not use_lora
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    first = trainer.state.log_history[0]
    for key in ("rewards/brightness/mean", "advantages/std", "approx_kl", "grad_norm", "loss"):
        assert math.isfinite(first[key]), key


@pytest.mark.parametrize(
    "name, guidance_scale",
    [(name, None) for name in EDIT_PIPELINES] + [(name, 4.0) for name in QWEN_EDIT_PIPELINES],
)
def test_ratio_is_one_at_the_first_inner_step(name, guidance_scale, tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer(
        name,
        tiny_pipeline_path,
        tmp_path,
        max_steps=1,
        rollout_batch_size=2,
        learning_rate=1.0,
        guidance_scale=guidance_scale,
    )
    assert trainer.adapter.use_cfg == (guidance_scale is not None)
    trainer.train()
    assert_first_step_on_policy(trainer)


@pytest.mark.parametrize(
    "name, guidance_scale",
    [(name, None) for name in EDIT_PIPELINES] + [(name, 4.0) for name in QWEN_EDIT_PIPELINES],
)
def test_deterministic_sampling_is_the_pipelines_own(name, guidance_scale, tiny_pipeline_path, tmp_path):
    # eta = 0 from the same initial noise: the trainer's edit equals the pipeline's own (its prompt encoding with the
    # source image, the source's tokens and positions, its schedule, CFG with the negative prompt seeing the image)
    trainer = make_edit_trainer(name, tiny_pipeline_path, tmp_path, guidance_scale=guidance_scale)
    image = source(2, size=(32, 32))
    images, trajectory = trainer.generate(["make it blue"], seed=4, images=[image])
    with pipeline_sources_at(32):
        call = pipeline_call(name, trainer, image, num_inference_steps=4, latents=trajectory.latents[:, 0])
        expected = trainer.pipeline(**call).images
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", EDIT_PIPELINES)
def test_lora_round_trip_through_load_lora_weights(name, tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(name)
    trainer = make_edit_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    with pipeline_sources_at(32):
        assert_lora_round_trip(trainer, path, tmp_path / "lora", pipeline_call(name, trainer, source(1)))


@pytest.mark.parametrize("name", EDIT_PIPELINES)
def test_the_source_image_reaches_the_model(name, tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer(name, tiny_pipeline_path, tmp_path)
    red, blue = source(0), source(2)

    def edit(image):  # one sample each: the same initial noise
        return trainer.generate(["make it green"], seed=3, images=[image])[0][0]

    assert (edit(red) - edit(blue)).abs().max() > 1e-3  # same instruction and noise, other source: other result
    torch.testing.assert_close(edit(red), edit(red.copy()))


@pytest.mark.parametrize("name", QWEN_EDIT_PIPELINES)
def test_the_prompt_encoder_sees_the_source_image(name, tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer(name, tiny_pipeline_path, tmp_path, guidance_scale=4.0)
    cond = trainer.adapter.encode_conditioning(["make it green"] * 2, [source(0), source(2)])
    for key in ("prompt_embeds", "negative_prompt_embeds"):  # with CFG the negative prompt sees the image too
        assert (cond[key][0] - cond[key][1]).abs().max() > 1e-4, key
    assert trainer.adapter.negative_conditioning() == {}


def test_images_as_paths_tensors_and_pil_are_the_same(tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer("tiny-flux-kontext", tiny_pipeline_path, tmp_path)
    image = source(1)
    image.save(tmp_path / "source.png")
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    edits = [
        trainer.generate(["add a hat"], seed=0, images=[x])[0] for x in (image, str(tmp_path / "source.png"), tensor)
    ]
    torch.testing.assert_close(edits[0], edits[1])
    torch.testing.assert_close(edits[0], edits[2])


def test_groups_share_source_and_noise_and_rewards_get_the_source(tiny_pipeline_path, tmp_path):
    seen = []

    def source_brightness(prompts, images, image, **kwargs):
        seen.append((list(prompts), list(image)))
        return [float(np.asarray(x).mean()) / 255 - float(y.mean()) for x, y in zip(image, images)]

    trainer = make_edit_trainer(
        "tiny-flux-kontext", tiny_pipeline_path, tmp_path, reward=source_brightness, max_steps=1, shuffle_dataset=False
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = trainer._generate_and_score(inputs)
    prompts, images = seen[-1]
    assert len(prompts) == 8 and prompts == [row["prompt"] for row in inputs]
    for group in range(2):  # 8 samples = 2 groups of 4: one instruction, one source, one initial noise each
        rows = range(4 * group, 4 * group + 4)
        assert len({prompts[i] for i in rows}) == 1
        assert len({np.asarray(images[i]).tobytes() for i in rows}) == 1
        noise = batch["latents"][4 * group, 0]
        assert all(torch.equal(batch["latents"][i, 0], noise) for i in rows)
        assert len({batch["latents"][i, -1].sum().item() for i in rows}) == 4  # different SDE noise, different edits
    assert prompts[0] != prompts[4] and np.asarray(images[0]).tobytes() != np.asarray(images[4]).tobytes()
    assert not torch.equal(batch["latents"][0, 0], batch["latents"][4, 0])


def test_missing_image_column_is_refused_at_construction(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="is image-to-image: train_dataset needs an 'image' column"):
        make_edit_trainer(
            "tiny-qwen-image-edit", tiny_pipeline_path, tmp_path, dataset=Dataset.from_dict({"prompt": INSTRUCTIONS})
        )
    images = [source(i) for i in range(4)]
    images[1] = None
    with pytest.raises(ValueError, match="Row 1 of train_dataset has no image"):
        make_edit_trainer("tiny-flux-kontext", tiny_pipeline_path, tmp_path, dataset=edit_dataset(images=images))
    several = edit_dataset(images=[[source(i), source(i + 1)] for i in range(4)])  # Qwen-Image-Edit-Plus's inference
    with pytest.raises(ValueError, match="holds several images per row; QwenImageEditPlusPipeline takes one"):
        make_edit_trainer("tiny-qwen-image-edit-plus", tiny_pipeline_path, tmp_path, dataset=several)
    tensors = [torch.rand(3, 32, 32) for _ in range(4)]  # one (3, H, W) tensor per row is one image
    make_edit_trainer("tiny-flux-kontext", tiny_pipeline_path, tmp_path, dataset=edit_dataset(images=tensors))


def test_logged_and_evaluation_samples_show_source_and_result(tiny_pipeline_path, tmp_path):
    eval_dataset = edit_dataset(prompts=["make it blue"], images=[source(3)])
    trainer = DanceGRPOTrainer(
        model=tiny_pipeline_path("tiny-flux-kontext"),
        reward_funcs=brightness,
        args=make_config(tmp_path, max_steps=1, shuffle_dataset=False),
        train_dataset=edit_dataset(),
        eval_dataset=eval_dataset,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_rewards/brightness/mean"])
    samples = os.path.join(trainer.args.output_dir, "_samples")
    edits, _ = trainer.generate(["make it blue"], seed=trainer.args.seed, images=[source(3)])
    for name, row_source, result in (("step-000001", source(0), None), ("eval-000001", source(3), edits[0])):
        logged = np.asarray(Image.open(os.path.join(samples, f"{name}.png")).convert("RGB"))
        assert logged.shape == (32, 2 * 32 + 4, 3)  # source | gap | result
        expected_source = (image_to_tensor(row_source, 32, 32) * 255).round().permute(1, 2, 0).numpy()
        np.testing.assert_allclose(logged[:, :32], expected_source, atol=1)
        assert (logged[:, 32:36] == 255).all()
        if result is not None:
            expected = (result.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(logged[:, 36:], expected)


def test_model_card_shows_sources_above_before_and_after(tiny_pipeline_path, tmp_path):
    trainer = make_edit_trainer(
        "tiny-qwen-image-edit",
        tiny_pipeline_path,
        tmp_path,
        peft_config=lora_config(),
        max_steps=1,
        learning_rate=1e-2,
    )
    trainer.train()
    trainer.create_model_card()
    output_dir = trainer.args.output_dir
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    assert card.data.pipeline_tag == "image-to-image" and "image-to-image" in card.data.tags
    assert 'source = load_image("source.png")' in card.text
    assert "image=source, prompt=" in card.text and "true_cfg_scale=1" in card.text
    assert "Top row: the source images; middle row: the edits before training" in card.text
    with open(os.path.join(output_dir, "images", "samples.png"), "rb") as handle:
        tiles = grid_tiles(handle.read(), rows=3, columns=4)
    for tile, index in zip(tiles[0], range(4)):
        expected = (image_to_tensor(source(index), 32, 32) * 255).round().permute(1, 2, 0).numpy()
        np.testing.assert_allclose(tile, expected, atol=1)
    edits, _ = trainer.generate(INSTRUCTIONS, seed=trainer.args.seed, images=[source(i) for i in range(4)])
    for tile, edit in zip(tiles[2], edits):
        assert (tile == (edit.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).all()
