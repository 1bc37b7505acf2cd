"""FLUX.2 [dev] (`Flux2Pipeline`: Mistral-3 prompts, embedded guidance) end to end on a tiny model loaded from disk
(32x32 px)."""

import pytest
import torch
from diffusers import DiffusionPipeline

from .test_distributed import assert_two_processes_match_one
from .test_resume import assert_resume_continues_exactly
from .test_trainer import (
    assert_lora_round_trip,
    assert_trains_what_it_should,
    lora_config,
    make_trainer,
)
from .test_video import one_thread  # noqa: F401 (fixture)


NAME = "tiny-flux2"
CALL = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")
MAX_LENGTH = 64  # the tiny processor's tokenizer length


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, peft_config=lora_config() if use_lora else None)
    assert type(trainer.adapter).__name__ == "Flux2Adapter" and not trainer.adapter.use_cfg
    assert_trains_what_it_should(trainer, use_lora)


@pytest.mark.parametrize("guidance_scale", [None, 2.5], ids=["default", "guidance-2.5"])
def test_rollout_is_the_pipelines_sampler(guidance_scale, tiny_pipeline_path, tmp_path):
    """With eta = 0 and the same initial noise, the trainer's sampler reproduces the pipeline's own images: Mistral-3
    prompt encoding, the embedded guidance (4 by default, as the pipeline), sigma grid, packing and decoding."""
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, num_inference_steps=3, guidance_scale=guidance_scale)
    adapter = trainer.adapter
    assert adapter.guidance_scale == (guidance_scale or 4.0)
    images, _ = trainer.generate(["a blue house"], seed=0)
    noise = trainer.sampler.initial_noise(0, 1, 0, 1, "cpu").transpose(1, 2)  # the pipeline's noise is unpacked
    latents = noise.reshape(1, *adapter.latent_shape)
    call = dict(**CALL, latents=latents, max_sequence_length=MAX_LENGTH)
    expected = trainer.pipeline(**call, guidance_scale=adapter.pipeline_guidance_scale()).images
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    other = trainer.pipeline(**call, guidance_scale=adapter.guidance_scale + 3).images
    assert (other - expected).abs().max() > 1e-3  # the guidance does reach the model: the match above means something


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(NAME)
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    call = {**CALL, "guidance_scale": trainer.adapter.pipeline_guidance_scale(), "max_sequence_length": MAX_LENGTH}
    assert_lora_round_trip(trainer, path, tmp_path / "lora", call)


def test_prompt_embeddings_are_the_pipelines(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(NAME), tmp_path, max_steps=1)
    cond = trainer.adapter.encode_prompts(["a cat", "a much longer prompt"])
    embeds, text_ids = trainer.pipeline.encode_prompt(["a cat"], max_sequence_length=MAX_LENGTH)
    assert cond["prompt_embeds"].shape == (2, MAX_LENGTH, 48)  # layers 10, 20 and 30 of width 16 side by side
    torch.testing.assert_close(cond["prompt_embeds"][:1], embeds)
    torch.testing.assert_close(cond["text_ids"][:1], text_ids)


def test_transformer_without_guidance_embedder_is_refused(tiny_pipeline_path, tmp_path):
    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path(NAME))
    pipeline.transformer.register_to_config(guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance_embeds"):
        make_trainer(pipeline, tmp_path)


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    assert_two_processes_match_one(tiny_pipeline_path(NAME), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True], ids=["lora"])  # full: the shared path, tested on FLUX and Wan 2.2
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", log_samples=False)
    peft = lora_config() if use_lora else None
    path = tiny_pipeline_path(NAME)
    assert_resume_continues_exactly(lambda out: make_trainer(path, out, peft_config=peft, **settings), tmp_path)
