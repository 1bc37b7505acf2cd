"""Z-Image (`ZImagePipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`), the two Qwen3-prompted text-to-image families,
end to end on tiny models loaded from disk (32x32 px)."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_trains_what_it_should,
    lora_config,
    make_trainer,
)
from .test_video import one_thread  # noqa: F401 (fixture)


FAMILIES = ["tiny-z-image", "tiny-flux2-klein"]
CALL = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(name), tmp_path, peft_config=lora_config() if use_lora else None)
    assert_trains_what_it_should(trainer, use_lora)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("guidance_scale", [None, 3.0], ids=["default", "cfg"])
def test_ratio_is_one_at_the_first_inner_step(name, guidance_scale, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path(name),
        tmp_path,
        max_steps=1,
        rollout_batch_size=2,
        learning_rate=1.0,
        guidance_scale=guidance_scale,
    )
    # Z-Image's default is Turbo's (no CFG); FLUX.2 [klein] base models sample with CFG 4
    default = {"tiny-z-image": 1.0, "tiny-flux2-klein": 4.0}[name]
    assert trainer.adapter.guidance_scale == (guidance_scale or default)
    trainer.train()
    assert_first_step_on_policy(trainer)


@pytest.mark.parametrize("name", FAMILIES)
def test_rollout_is_the_pipelines_sampler(name, tiny_pipeline_path, tmp_path):
    """With eta = 0 and the same initial noise, the trainer's sampler reproduces the pipeline's own images: prompt
    encoding, timesteps, sigma grid, guidance convention, velocity sign, packing and decoding all match."""
    trainer = make_trainer(tiny_pipeline_path(name), tmp_path, num_inference_steps=3, guidance_scale=3.0)
    adapter = trainer.adapter
    images, _ = trainer.generate(["a blue house"], seed=0)
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu")
    if name == "tiny-flux2-klein":  # the pipeline takes the noise before packing: (1, C, h, w)
        noise = noise.transpose(1, 2)
    latents = noise.reshape(1, *adapter.latent_shape)
    expected = trainer.pipeline(
        **CALL, latents=latents, guidance_scale=adapter.pipeline_guidance_scale(), max_sequence_length=48
    ).images
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_round_trip_through_load_lora_weights(name, tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(name)
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    call = {**CALL, "guidance_scale": trainer.adapter.pipeline_guidance_scale(), "max_sequence_length": 48}
    assert_lora_round_trip(trainer, path, tmp_path / "lora", call)


def test_z_image_prompt_embeddings_keep_only_the_prompt_tokens(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-z-image"), tmp_path, max_steps=1)
    cond = trainer.adapter.encode_prompts(["a cat", "a much longer prompt"])
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and cond["prompt_embeds"].shape[1] == 48  # padded to the tokenizer's length
    embeds, _ = trainer.pipeline.encode_prompt(["a cat"], do_classifier_free_guidance=False, max_sequence_length=48)
    torch.testing.assert_close(cond["prompt_embeds"][0][cond["prompt_mask"][0]], embeds[0])
    assert trainer.adapter.pipeline_guidance_scale() == 0.0  # Turbo: ZImagePipeline(guidance_scale=0)


def test_flux2_klein_sigmas_are_the_pipelines(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux2-klein"), tmp_path, num_inference_steps=4)
    pipeline, seen = trainer.pipeline, []
    pipeline.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"][0].item()), with_kwargs=True
    )
    pipeline(**{**CALL, "num_inference_steps": 4}, guidance_scale=1.0, max_sequence_length=48)
    np.testing.assert_allclose(seen, trainer.adapter.sigmas[:-1].numpy(), rtol=1e-6)  # dynamic shift by `mu`


def test_distilled_flux2_klein_refuses_cfg(tiny_pipeline_path, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path("tiny-flux2-klein"))
    pipeline.register_to_config(is_distilled=True)
    with pytest.raises(ValueError, match="step-distilled"):
        make_trainer(pipeline, tmp_path, guidance_scale=4.0)
    assert make_trainer(pipeline, tmp_path).adapter.guidance_scale == 1.0  # distilled: no CFG by default
