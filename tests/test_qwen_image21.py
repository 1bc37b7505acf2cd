"""Qwen-Image 2.1 (`QwenImage21Pipeline`: Qwen3-VL prompts, a single-stream block-causal transformer, unpatched
latents, an RGBA VAE) end to end on a tiny model loaded from disk (32x32 px)."""

import math

import pytest
import torch

from trl_dancegrpo.adapters.qwen_image21 import composite_over_white

from .test_distributed import assert_two_processes_match_one
from .test_resume import assert_resume_continues_exactly
from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_trains_what_it_should,
    lora_config,
    make_trainer,
)
from .test_video import one_thread  # noqa: F401 (fixture)


NAME = "tiny-qwen-image21"
CALL = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt", use_kv_cache=False)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, peft_config=lora_config() if use_lora else None)
    assert type(trainer.adapter).__name__ == "QwenImage21Adapter" and not trainer.adapter.use_cfg
    assert_trains_what_it_should(trainer, use_lora)


def test_train_with_cfg_is_on_policy(tiny_pipeline_path, tmp_path):
    """True CFG (prompts of different lengths and the negative " " in one batch, run per length) re-scores its
    rollout exactly."""
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, guidance_scale=3.0, max_steps=1)
    assert trainer.adapter.use_cfg
    trainer.train()
    assert_first_step_on_policy(trainer)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=["default", "cfg-3"])
def test_rollout_is_the_pipelines_sampler(guidance_scale, tiny_pipeline_path, tmp_path):
    """With eta = 0 and the same initial noise, the trainer's sampler reproduces the pipeline's own latents and images:
    Qwen3-VL prompt encoding, the sigma grid shifted for the image's token count, the transformer's joint sequence and
    true CFG as `__call__` (the RGBA output composited over white for the rewards)."""
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, num_inference_steps=3, guidance_scale=guidance_scale)
    adapter = trainer.adapter
    images, trajectory = trainer.generate(["a blue house"], seed=0)
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu")  # packed: (1, h * w, C), as the pipeline takes it
    call = dict(CALL, latents=noise, **adapter.pipeline_guidance_arguments())
    expected = trainer.pipeline(**call).images
    assert expected.shape == (1, 4, 32, 32)  # RGBA
    torch.testing.assert_close(images, composite_over_white(expected), rtol=1e-4, atol=1e-4)
    with_cache = trainer.pipeline(**{**call, "use_kv_cache": True}).images  # the pipeline's default: same model
    torch.testing.assert_close(images, composite_over_white(with_cache), rtol=1e-3, atol=1e-3)
    if guidance_scale:
        unguided = trainer.pipeline(**{**call, "true_cfg_scale": 1.0}).images
        assert (unguided - expected).abs().max() > 1e-3  # the guidance does reach the model


def test_prediction_does_not_depend_on_the_batch(tiny_pipeline_path, tmp_path):
    """Rows with prompts of different lengths predict as each alone (the transformer's positions count padding)."""
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, max_steps=1)
    adapter = trainer.adapter
    prompts = ["a cat", "a much longer prompt about a dog"]
    cond = adapter.encode_prompts(prompts)
    assert cond["prompt_embeds_mask"].sum(1).tolist()[0] < cond["prompt_embeds"].shape[1]
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(0), "cpu", torch.float32)
    steps = torch.tensor([0, 1])
    with torch.no_grad():
        both = adapter.predict(trainer.model, noise, steps, cond)
        for i, prompt in enumerate(prompts):
            alone = adapter.encode_prompts([prompt])
            embeds, _, _ = trainer.pipeline.encode_prompt(prompt=[prompt])
            torch.testing.assert_close(alone["prompt_embeds"], embeds)  # the pipeline's own embeddings
            torch.testing.assert_close(
                adapter.predict(trainer.model, noise[i : i + 1], steps[i : i + 1], alone), both[i : i + 1]
            )


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(NAME)
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    assert_lora_round_trip(trainer, path, tmp_path / "lora", CALL)


def test_composite_over_white():
    rgba = torch.tensor([[0.2, 0.4, 0.6, 0.5]]).view(1, 4, 1, 1).double()
    expected = torch.tensor([0.2 * 0.5 + 0.5, 0.4 * 0.5 + 0.5, 0.6 * 0.5 + 0.5]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(composite_over_white(rgba), expected)
    rgb = torch.rand(2, 3, 4, 4)
    assert composite_over_white(rgb) is rgb


def test_sigma_grid_is_the_pipelines(tiny_pipeline_path, tmp_path, caplog):
    """The checkpoint's `sample_sigmas` when their length is the step count (the pipeline's default grid); otherwise
    `linspace(1, 1/T, T)` with a warning (what the pipeline uses without them). The eta-0 rollout matches the pipeline
    sampling on its configured grid."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path(NAME))
    default = make_trainer(pipeline, tmp_path, num_inference_steps=3).adapter.sigmas
    pipeline.register_to_config(sample_sigmas=[1.0, 0.6, 0.25])
    trainer = make_trainer(pipeline, tmp_path, num_inference_steps=3)
    configured = trainer.adapter.sigmas
    assert len(configured) == 4 and configured[-1] == 0 and not torch.allclose(configured, default)
    images, _ = trainer.generate(["a blue house"], seed=0)
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu")
    # 40 steps asked: the pipeline's configured grid decides
    expected = trainer.pipeline(**{**CALL, "num_inference_steps": 40}, latents=noise).images
    torch.testing.assert_close(images, composite_over_white(expected), rtol=1e-4, atol=1e-4)
    with caplog.at_level("WARNING"):
        other = make_trainer(pipeline, tmp_path, num_inference_steps=4).adapter.sigmas
    assert "sample_sigmas have 3 steps" in caplog.text and len(other) == 5


def test_every_parameter_gets_a_gradient(tiny_pipeline_path, tmp_path):
    """Nothing is declared unused (`unused_parameter_prefixes` is empty): a backward reaches every parameter, as DDP
    needs, through rows of two prompt lengths."""
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, max_steps=1)
    model, adapter = trainer.model, trainer.adapter
    assert adapter.unused_parameter_prefixes() == []
    model.requires_grad_(True)
    cond = adapter.encode_prompts(["a cat", "a much longer prompt"])
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(0), "cpu", torch.float32)
    adapter.predict(model, noise, torch.tensor([0, 1]), cond).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    # prompts of different lengths run in groups by length: the groups differ between one process and two; with CFG
    # (each branch its own forward), which covers the default's single forward too
    assert_two_processes_match_one(tiny_pipeline_path(NAME), tmp_path, ["--guidance_scale", "3.0"])


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True], ids=["lora"])  # full: the shared path, tested on FLUX and Wan 2.2
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", log_samples=False)
    peft = lora_config() if use_lora else None
    path = tiny_pipeline_path(NAME)
    assert_resume_continues_exactly(lambda out: make_trainer(path, out, peft_config=peft, **settings), tmp_path)
