"""Stable Diffusion 3 (`StableDiffusion3Pipeline`) end to end on a tiny model loaded from disk."""

import math

import numpy as np
import pytest

from .test_trainer import (
    IMAGE_CALL,
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_trainer,
    snapshot_parameters,
)
from .test_video import one_thread  # noqa: F401 (fixture)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-sd3"), tmp_path, peft_config=lora_config() if use_lora else None)
    before = snapshot_parameters(trainer)
    trainable, frozen = before["trainable"], before["frozen"]
    assert trainable and before["others"]
    assert all("lora" in n for n in trainable) or not use_lora
    # the last block's context queries reach nothing (SD3's last block is context-pre-only): kept frozen
    assert not any("transformer_blocks.1.attn.add_q_proj" in n for n in trainable)
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in trainable)
    if not use_lora:
        assert set(frozen) == {
            "transformer_blocks.1.attn.add_q_proj.weight",
            "transformer_blocks.1.attn.add_q_proj.bias",
        }
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    first = trainer.state.log_history[0]
    for key in ("rewards/brightness/mean", "advantages/std", "approx_kl", "grad_norm", "loss"):
        assert math.isfinite(first[key]), key


@pytest.mark.parametrize("batch, rollout_batch_size", [(8, 2), (12, None)])
def test_ratio_is_one_at_the_first_inner_step(batch, rollout_batch_size, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-sd3"),
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=batch,
        rollout_batch_size=rollout_batch_size,
        learning_rate=1.0,
    )
    trainer.train()
    assert_first_step_on_policy(trainer)


def test_cfg_and_timesteps(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-sd3"), tmp_path, max_steps=1, rollout_batch_size=4)
    assert trainer.adapter.guidance_scale == 4.5 and trainer.adapter.use_cfg  # flow-GRPO's SD3.5 recipe
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[0], kwargs["timestep"])), with_kwargs=True
    )
    trainer.train()
    # both branches in one forward: 2 x 4 rows; rollout 4 steps x 2 slices, loss int(0.6 * 3) = 1 step x 2 slices
    assert [rows for rows, _ in seen] == [8] * (4 * 2 + 1 * 2)
    # the rollout's timesteps are the pipeline scheduler's (sigma * 1000, shift 3 for SD3)
    scheduler = trainer.pipeline.scheduler
    scheduler.set_timesteps(4)
    rollout = [timestep[0].item() for _, timestep in seen[:4]]  # the first slice's 4 steps
    np.testing.assert_allclose(rollout, scheduler.timesteps.numpy(), rtol=1e-5)


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-sd3")
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    assert_lora_round_trip(trainer, path, tmp_path / "lora", IMAGE_CALL)
