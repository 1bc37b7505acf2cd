"""Qwen-Image (`QwenImagePipeline`) end to end on a tiny model loaded from disk: training, the pipeline's own sampler
reproduced, its prompt template, true CFG with the norm rescale, the LoRA round trip."""

import math

import pytest
import torch

from trl_dancegrpo.rollout import denoise

from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_trainer,
    snapshot_parameters,
)
from .test_video import one_thread  # noqa: F401 (fixture)


QWEN_CALL = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")
# the last block's text stream reaches nothing (its output is discarded): frozen, so DDP sees every trained parameter
LAST_BLOCK_TEXT_OUTPUT = ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-qwen-image"), tmp_path, peft_config=lora_config() if use_lora else None
    )
    before = snapshot_parameters(trainer)
    trainable, frozen = before["trainable"], before["frozen"]
    assert trainable and before["others"]
    assert all("lora" in n for n in trainable) or not use_lora
    assert not any(n.startswith(f"transformer_blocks.1.{m}") for n in trainable for m in LAST_BLOCK_TEXT_OUTPUT)
    assert any(n.startswith("transformer_blocks.0.attn.to_add_out") for n in trainable)
    if not use_lora:
        assert {n.rsplit(".", 1)[0] for n in frozen} == {
            "transformer_blocks.1.attn.add_q_proj",
            "transformer_blocks.1.attn.norm_added_q",
            "transformer_blocks.1.attn.to_add_out",
            "transformer_blocks.1.txt_mlp.net.0.proj",
            "transformer_blocks.1.txt_mlp.net.2",
        }
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    first = trainer.state.log_history[0]
    for key in ("rewards/brightness/mean", "advantages/std", "approx_kl", "grad_norm", "loss"):
        assert math.isfinite(first[key]), key


def test_unused_parameters_get_no_gradient(tiny_pipeline_path, tmp_path):
    # what `unused_parameter_prefixes` names is exactly what a backward leaves without gradient
    trainer = make_trainer(tiny_pipeline_path("tiny-qwen-image"), tmp_path)
    model, adapter = trainer.model, trainer.adapter
    model.requires_grad_(True)
    cond = adapter.encode_prompts(["a cat", "a dog"])
    noise = adapter.initial_noise(2, torch.Generator().manual_seed(0), "cpu", torch.float32)
    adapter.predict(model, noise, torch.tensor([0, 1]), cond).square().mean().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    unused = tuple(f"{prefix}." for prefix in adapter.unused_parameter_prefixes())
    assert no_grad == {n for n, _ in model.named_parameters() if n.startswith(unused)}


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_ratio_is_one_at_the_first_inner_step(guidance_scale, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-qwen-image"),
        tmp_path,
        max_steps=1,
        rollout_batch_size=2,
        learning_rate=1.0,
        guidance_scale=guidance_scale,
    )
    assert trainer.adapter.use_cfg == (guidance_scale > 1)
    trainer.train()
    assert_first_step_on_policy(trainer)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_deterministic_sampling_is_the_pipelines_own(guidance_scale, tiny_pipeline_path, tmp_path):
    # eta = 0 is the Euler step: from the same initial noise, the trainer and the pipeline's own __call__ (its scheduler
    # grid with the resolution shift, its prompt encoding, its true CFG with the norm rescale, its decoding) agree
    trainer = make_trainer(tiny_pipeline_path("tiny-qwen-image"), tmp_path, guidance_scale=guidance_scale)
    images, trajectory = trainer.generate(["a blue house"], seed=5)
    call = dict(
        QWEN_CALL,
        num_inference_steps=4,
        latents=trajectory.latents[:, 0],
        **trainer.adapter.pipeline_guidance_arguments(),
    )
    expected = trainer.pipeline(**call).images
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


def test_cfg_pads_prompts_of_other_lengths_and_rescales_to_the_conditional_norm(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-qwen-image"), tmp_path, guidance_scale=4.0)
    adapter, model = trainer.adapter, trainer.model
    cond = adapter.encode_prompts(["a much longer prompt than the negative one", "a cat"])
    negative = adapter.negative_conditioning()
    assert cond["prompt_embeds"].shape[1] > negative["prompt_embeds"].shape[1]
    assert cond["prompt_embeds_mask"][1].sum() < cond["prompt_embeds"].shape[1]  # "a cat" is padded in its batch
    latents = adapter.initial_noise(2, torch.Generator().manual_seed(0), "cpu", torch.float32)
    step = torch.tensor([1, 2])
    with torch.no_grad():
        guided = denoise(adapter, model, latents, step, cond, negative)
        # each branch alone, unpadded, as the pipeline runs them
        text = torch.cat(
            [adapter.predict(model, latents[i : i + 1], step[i : i + 1], one_row(cond, i)) for i in (0, 1)]
        )
        uncond = adapter.predict(model, latents, step, {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()})
    combined = uncond + 4.0 * (text - uncond)
    expected = combined * text.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided.norm(dim=-1), text.norm(dim=-1), rtol=1e-4, atol=1e-5)


def one_row(cond, i):
    """Row `i` of a conditioning without its padding."""
    length = int(cond["prompt_embeds_mask"][i].sum())
    return {key: value[i : i + 1, :length] for key, value in cond.items()}


def test_prompt_template_is_dropped_and_prompts_matter(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-qwen-image"), tmp_path)
    pipeline = trainer.pipeline
    cond = trainer.adapter.encode_prompts(["a cat", "a dog"])
    # what remains after the pipeline's crop of 34 tokens: the prompt and the template's end, nothing before
    template = pipeline.prompt_template_encode
    prefix, suffix = template.split("{}")
    assert len(pipeline.tokenizer(prefix)["input_ids"]) == pipeline.prompt_template_encode_start_idx == 34
    kept = len(pipeline.tokenizer("a cat" + suffix)["input_ids"])
    assert cond["prompt_embeds"].shape[1] == kept and cond["prompt_embeds_mask"].all()
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-qwen-image")
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    assert_lora_round_trip(trainer, path, tmp_path / "lora", QWEN_CALL)


def test_sizes_that_do_not_pack_are_refused(tiny_pipeline_path):
    # 4x VAE downsampling then 2x2 patches: multiples of 8 pixels (the config asks for multiples of 16 anyway; the
    # adapter checks for itself when built directly)
    from diffusers import DiffusionPipeline

    from trl_dancegrpo.adapters import QwenImageAdapter

    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path("tiny-qwen-image"))
    with pytest.raises(ValueError, match="QwenImagePipeline needs height and width divisible by 8, got 36x32"):
        QwenImageAdapter(pipeline, 4, height=36, width=32)
