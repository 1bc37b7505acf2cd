"""The trainer with two model rewards at once: an image-text one (HPS) and an image-only one (aesthetic)."""

import math

import pytest
import torch

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.rewards import REWARD_REGISTRY, AestheticReward, HPSReward, clear_model_cache, tiny


pytest.importorskip("open_clip")  # a guard only: CI installs it


def test_train_with_two_model_rewards_logs_each_separately(tiny_pipeline_path, prompts_dataset, tmp_path, monkeypatch):
    hps_checkpoint = tiny.save_tiny_hps_checkpoint(str(tmp_path / "HPS_v2.1_compressed.pt"))
    clip_dir = tiny.save_tiny_clip_model(str(tmp_path / "clip"))
    aesthetic_checkpoint = tiny.save_tiny_aesthetic_checkpoint(str(tmp_path / "aesthetic.pth"))
    # "hpsv2.1" as a string goes through the registry (here pointed at the tiny checkpoint); the aesthetic reward is
    # passed as an instance, logged by its `__name__`.
    tiny_hps = tiny.register_tiny_open_clip_config()
    monkeypatch.setitem(
        REWARD_REGISTRY,
        "hpsv2.1",
        lambda **kwargs: HPSReward(checkpoint_path=hps_checkpoint, clip_model=tiny_hps, **kwargs),
    )
    aesthetic = AestheticReward(checkpoint_path=aesthetic_checkpoint, clip_model_name_or_path=clip_dir)
    clear_model_cache()
    args = DanceGRPOConfig(
        output_dir=str(tmp_path / "out"),
        num_generations=2,
        num_inference_steps=2,
        per_device_train_batch_size=4,
        max_steps=2,
        height=32,
        width=32,
        report_to="none",
        logging_steps=1,
    )
    trainer = DanceGRPOTrainer(
        model=tiny_pipeline_path("tiny-flux"),
        reward_funcs=["hpsv2.1", aesthetic],
        args=args,
        train_dataset=prompts_dataset,
    )
    hps = trainer.reward_funcs[0]
    assert isinstance(hps, HPSReward)
    # The trainer handed its device and dtype to both model rewards.
    assert hps.device == aesthetic.device == trainer.accelerator.device
    assert hps.dtype == aesthetic.dtype == torch.float32
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "rewards/hpsv2.1/mean" in entry]
    assert len(logged) == 2  # one entry per step (logging_steps=1)
    for entry in logged:
        for name in ("hpsv2.1", "aesthetic"):
            for statistic in ("mean", "std"):
                assert math.isfinite(entry[f"rewards/{name}/{statistic}"])
    # Two different models scored the same images: their logs are not copies of one another.
    assert [e["rewards/hpsv2.1/mean"] for e in logged] != [e["rewards/aesthetic/mean"] for e in logged]
    assert all(-1 <= e["rewards/hpsv2.1/mean"] <= 1 for e in logged)  # HPS scores are cosines
