"""HunyuanVideo 1.5 text-to-video (`HunyuanVideo15Pipeline`) and image-to-video (`HunyuanVideo15ImageToVideoPipeline`)
end to end on tiny models loaded from disk (32x32 px, 5 frames): CFG through the pipeline's guider, the LoRA loaded
with `transformer.load_lora_adapter` (diffusers has no LoRA loader mixin for these pipelines)."""

import math

import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image

from trl_dancegrpo.evaluation import _load_trained_weights

from .test_distributed import assert_two_processes_match_one
from .test_resume import assert_resume_continues_exactly
from .test_trainer import (
    assert_first_step_on_policy,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_trainer,
    snapshot_parameters,
)
from .test_video import one_thread, solid  # noqa: F401 (fixture)


T2V, I2V = "tiny-hunyuan-video15", "tiny-hunyuan-video15-i2v"
# quoted text goes through the glyph (ByT5) encoder as well: without any, its projection would get no gradient
PROMPTS = ["a cat", 'a sign that reads "open"', "a car", "a tree"]
IMAGES = [solid(color) for color in [(220, 40, 40), (40, 200, 60), (30, 60, 220), (240, 240, 240)]]


def make_hv15_trainer(name, tiny_pipeline_path, tmp_path, **overrides):
    overrides.setdefault("num_frames", 5)
    rows = {"prompt": PROMPTS, **({"image": IMAGES} if name == I2V else {})}
    return make_trainer(tiny_pipeline_path(name), tmp_path, dataset=Dataset.from_dict(rows), **overrides)


def align(pipeline, adapter):
    """The tiny tokenizers' lengths and template count in the pipeline, so that its own call encodes as the adapter:
    the real pipeline pads to 1000 and 256 tokens and crops the 108 template tokens of Qwen2.5-VL's tokenizer (padding
    is masked out, so the lengths change nothing but the cost; the tiny tokenizer counts 123 template tokens)."""
    pipeline.tokenizer_max_length, pipeline.tokenizer_2_max_length = adapter.max_length, adapter.max_length_2
    pipeline.prompt_template_encode_start_idx = adapter.crop_start
    return pipeline


def pipeline_call(name, **extra):
    call = dict(prompt="a blue house", num_frames=5, num_inference_steps=3, output_type="pt", **extra)
    return {**call, "image": solid((200, 120, 20))} if name == I2V else {**call, "height": 32, "width": 32}


@pytest.mark.parametrize("name", [T2V, I2V])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_hv15_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config() if use_lora else None)
    adapter = trainer.adapter
    expected = "HunyuanVideo15ImageToVideoAdapter" if name == I2V else "HunyuanVideo15Adapter"
    assert type(adapter).__name__ == expected and adapter.use_cfg and adapter.guidance_scale == 6.0  # the guider's
    assert adapter.task == ("image-to-video" if name == I2V else "text-to-video")
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    if use_lora:
        assert all("lora" in n for n in before["trainable"])
    else:  # the last block's text stream reaches nothing (nor, without an image, the image projection): frozen
        last = {"attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"}
        image = {
            "image_embedder.norm_in",
            "image_embedder.linear_1",
            "image_embedder.linear_2",
            "image_embedder.norm_out",
        }
        expected = {f"transformer_blocks.1.{n}" for n in last} | (set() if name == I2V else image)
        assert {n.rsplit(".", 1)[0] for n in before["frozen"]} == expected
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert_first_step_on_policy(trainer)
    for log in trainer.state.log_history[:2]:
        assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"])


@pytest.mark.parametrize("name", [T2V, I2V])
def test_ratio_is_one_with_cfg_in_slices(name, tiny_pipeline_path, tmp_path):
    trainer = make_hv15_trainer(
        name, tiny_pipeline_path, tmp_path, max_steps=1, rollout_batch_size=2, learning_rate=1.0
    )
    trainer.train()
    assert_first_step_on_policy(trainer)


@pytest.mark.parametrize("name", [T2V, I2V])
@pytest.mark.parametrize("guidance_scale", [None, 1.0, 3.5], ids=["guider-6", "no-cfg", "cfg-3.5"])
def test_rollout_is_the_pipelines_sampler(name, guidance_scale, tiny_pipeline_path, tmp_path):
    """With eta = 0 and the same initial noise, the trainer reproduces the pipeline's own videos: both prompt encoders,
    the guider's CFG (the pipeline runs the branches one at a time, the rollout in one batch), the conditioning
    channels and (image-to-video) the SigLIP tokens, the sigma grid and decoding."""
    trainer = make_hv15_trainer(
        name, tiny_pipeline_path, tmp_path, num_inference_steps=3, guidance_scale=guidance_scale
    )
    adapter = trainer.adapter
    assert adapter.use_cfg == (guidance_scale != 1.0)
    image = solid((200, 120, 20))
    videos, _ = trainer.generate(["a blue house"], seed=0, images=[image] if name == I2V else None)
    pipeline = align(trainer.pipeline, adapter)
    pipeline.guider = pipeline.guider.new(guidance_scale=adapter.guidance_scale)  # the model card's line
    assert adapter.pipeline_setup() == [f"pipe.guider = pipe.guider.new(guidance_scale={adapter.guidance_scale:g})"]
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu")
    expected = pipeline(**pipeline_call(name, latents=noise)).frames
    assert expected.shape == videos.shape == (1, 5, 3, 32, 32)
    torch.testing.assert_close(videos, expected, rtol=1e-4, atol=1e-4)
    # the guidance reaches the model, so the match above means something
    pipeline.guider = pipeline.guider.new(guidance_scale=adapter.guidance_scale + 3)
    assert (pipeline(**pipeline_call(name, latents=noise)).frames - expected).abs().max() > 1e-3


def test_the_conditioning_image_reaches_the_model(tiny_pipeline_path, tmp_path):
    trainer = make_hv15_trainer(I2V, tiny_pipeline_path, tmp_path)
    red, blue = solid((230, 20, 20)), solid((20, 20, 230))
    videos, _ = trainer.generate(["a cat", "a cat"], seed=3, images=[red, blue], group_size=2)
    same, _ = trainer.generate(["a cat", "a cat"], seed=3, images=[red, red], group_size=2)
    assert (videos[0] - videos[1]).abs().max() > 1e-3
    torch.testing.assert_close(same[0], same[1])
    # both CFG branches see the image: its latents in the first frame (masked as such) and its SigLIP tokens
    cond = trainer.adapter.encode_conditioning(["a cat"], [red])
    assert cond["image_latents"].shape == (1, 4, 1, 4, 4) and cond["image_embeds"].shape == (1, 16, 12)
    model_input = trainer.adapter.model_input(torch.zeros(1, 4, 2, 4, 4), cond)
    assert torch.equal(model_input[:, 4:8, :1], cond["image_latents"]) and not model_input[:, 4:8, 1:].any()
    assert model_input[:, 8, 0].eq(1).all() and not model_input[:, 8, 1:].any()


def test_missing_image_column_is_a_clear_error(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="image-to-video: train_dataset needs an 'image' column"):
        make_trainer(tiny_pipeline_path(I2V), tmp_path, dataset=Dataset.from_dict({"prompt": PROMPTS}), num_frames=5)


def test_a_guider_other_than_plain_cfg_is_refused(tiny_pipeline_path, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path(T2V))
    pipeline.guider = pipeline.guider.new(guidance_rescale=0.7)
    with pytest.raises(ValueError, match="guidance_rescale.*only plain classifier-free guidance"):
        make_trainer(pipeline, tmp_path, num_frames=5)


@pytest.mark.parametrize("name", [T2V, I2V])
def test_lora_round_trip_through_load_lora_adapter(name, tiny_pipeline_path, tmp_path):
    """The saved LoRA loads into a fresh pipeline's transformer with `load_lora_adapter` (what the card shows) and
    reproduces the trained outputs."""
    path = tiny_pipeline_path(name)
    trainer = make_hv15_trainer(name, tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    call = pipeline_call(name)

    def sample(pipeline):
        return pipeline(**call, generator=torch.Generator().manual_seed(0)).frames

    trained = sample(align(trainer.pipeline, trainer.adapter))
    base = align(DiffusionPipeline.from_pretrained(path), trainer.adapter)
    untouched = sample(base)
    base.transformer.load_lora_adapter(str(folder), weight_name="pytorch_lora_weights.safetensors")  # the card's
    loaded = sample(base)
    assert (trained - untouched).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    # `trl-dancegrpo evaluate --adapter` loads it the same way, and unloads it
    fresh = make_hv15_trainer(name, tiny_pipeline_path, tmp_path / "fresh")
    undo = _load_trained_weights(fresh, str(folder))
    torch.testing.assert_close(sample(align(fresh.pipeline, fresh.adapter)), trained, rtol=1e-4, atol=1e-5)
    undo()
    torch.testing.assert_close(sample(fresh.pipeline), untouched, rtol=1e-4, atol=1e-5)
    card = ModelCard.load(str(folder / "README.md")).text
    assert 'load_lora_adapter("<your-username>/lora", weight_name="pytorch_lora_weights.safetensors")' in card
    assert "pipe.load_lora_weights(" not in card
    assert "pipe.guider = pipe.guider.new(guidance_scale=6)" in card
    assert "pipe.transformer.fuse_lora(); pipe.transformer.unload_lora()" in card
    assert ("height=" in card) == (name == T2V)  # the image-to-video pipeline takes its size from the image


@pytest.mark.slow
def test_ema_loads_through_load_lora_adapter_as_the_card_says(tiny_pipeline_path, tmp_path):
    trainer = make_hv15_trainer(
        T2V, tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2, ema_decay=0.5
    )
    trainer.train()
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    card = ModelCard.load(str(folder / "README.md")).text
    assert 'load_lora_adapter("<your-username>/lora", weight_name="ema/pytorch_lora_weights.safetensors")' in card
    call = pipeline_call(T2V)

    def sample(pipeline):
        return pipeline(**call, generator=torch.Generator().manual_seed(0)).frames

    with trainer.ema.applied():
        expected = sample(align(trainer.pipeline, trainer.adapter))
    base = align(DiffusionPipeline.from_pretrained(tiny_pipeline_path(T2V)), trainer.adapter)
    base.transformer.load_lora_adapter(str(folder), weight_name="ema/pytorch_lora_weights.safetensors")
    torch.testing.assert_close(sample(base), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    # image-to-video: the text-to-video path plus the image column (kept to one launch: the suite's time)
    assert_two_processes_match_one(tiny_pipeline_path(I2V), tmp_path, ["--num_frames", "5", "--conditioning", "image"])


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True], ids=["lora"])  # full: the shared path, tested on FLUX and Wan 2.2
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", log_samples=False)
    peft = lora_config() if use_lora else None
    assert_resume_continues_exactly(
        lambda out: make_hv15_trainer(I2V, tiny_pipeline_path, out, peft_config=peft, **settings), tmp_path
    )


def test_an_image_of_another_size_is_cropped_as_the_pipeline_does(tiny_pipeline_path, tmp_path):
    trainer = make_hv15_trainer(I2V, tiny_pipeline_path, tmp_path)
    image = Image.effect_mandelbrot((48, 40), (-2, -1.2, 0.8, 1.2), 40).convert("RGB")
    cropped = trainer.pipeline.video_processor.resize(image, height=32, width=32, resize_mode="crop")
    with torch.no_grad():
        got, expected = (trainer.adapter.encode_images([x]) for x in (image, cropped))
    for key in got:
        torch.testing.assert_close(got[key], expected[key])


def test_step_distilled_transformer_gets_the_steps_end(tiny_pipeline_path, tmp_path):
    """The step-distilled image-to-video checkpoint (`use_meanflow`) also takes each step's end timestep (`timestep_r`,
    0 at the last step); the rollout then still reproduces the pipeline."""
    from diffusers import HunyuanVideo15Transformer3DModel

    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path(I2V))
    torch.manual_seed(0)
    pipeline.transformer = HunyuanVideo15Transformer3DModel.from_config(pipeline.transformer.config, use_meanflow=True)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "image": IMAGES})
    trainer = make_trainer(
        pipeline, tmp_path, dataset=dataset, num_frames=5, num_inference_steps=3, guidance_scale=1.0
    )
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["timestep"], kwargs["timestep_r"])), with_kwargs=True
    )
    image = solid((200, 120, 20))
    videos, _ = trainer.generate(["a blue house"], seed=0, images=[image])
    sigmas = trainer.adapter.sigmas * 1000
    torch.testing.assert_close(torch.stack([t for t, _ in seen]).flatten(), sigmas[:3])
    torch.testing.assert_close(torch.stack([r for _, r in seen]).flatten(), sigmas[1:])
    assert seen[-1][1].item() == 0
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu")
    pipeline.guider = pipeline.guider.new(guidance_scale=1.0)
    expected = align(pipeline, trainer.adapter)(**pipeline_call(I2V, latents=noise)).frames
    torch.testing.assert_close(videos, expected, rtol=1e-4, atol=1e-4)
