"""What video brought to the shared core: best-of-n selection, the CFG update rule, gradient checkpointing, VAE
tiling/slicing, and sample logging (GIF files and the reporting integrations)."""

import pytest
import torch
from PIL import Image

from trl_dancegrpo import DanceGRPOConfig
from trl_dancegrpo.trainer import best_of_n_indices, compute_advantages

from .test_trainer import make_config
from .test_video import make_video_trainer, one_thread  # noqa: F401 (fixture)


# -- best-of-n ------------------------------------------------------------------------------------------------------
def test_best_of_n_keeps_the_top_and_bottom_of_each_group():
    advantages = torch.tensor([0.1, 0.5, -0.3, 0.0, 2.0, 1.0, 3.0, -1.0])
    assert best_of_n_indices(advantages, 4, 2).tolist() == [1, 2, 6, 7]
    assert best_of_n_indices(advantages, 4, 4).tolist() == list(range(8))
    advantages = torch.arange(12.0)
    assert best_of_n_indices(advantages, 6, 4).tolist() == [0, 1, 4, 5, 6, 7, 10, 11]


FIXED_REWARDS = [0.0, 3.0, 1.0, 2.0, 5.0, 4.0, 7.0, 6.0]


def fixed(prompts, images, **kwargs):
    return FIXED_REWARDS[: len(prompts)]


def test_best_of_n_trains_on_the_extremes_with_whole_group_advantages(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(
        "tiny-hunyuan-video", tiny_pipeline_path, tmp_path, reward=fixed, best_of_n=2, max_steps=1
    )
    rows = [{"prompt": p} for p in ["a cat"] * 4 + ["a dog"] * 4]
    batch = trainer._generate_and_score(rows)
    # group 1: rewards 0 3 1 2 -> best index 1, worst 0; group 2: 5 4 7 6 -> best 6, worst 5
    full = compute_advantages(torch.tensor(FIXED_REWARDS)[:, None], 4, torch.ones(1), adv_clip_max=5.0)
    torch.testing.assert_close(batch["advantages"], full[[0, 1, 5, 6]])
    assert batch["advantages"].abs().min() > 1.1  # the whole group's std, not the pair's (which gives 0.707)
    assert batch["latents"].shape[0] == batch["train_steps"].shape[0] == batch["cond"]["prompt_embeds"].shape[0] == 4

    sizes = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    trainer.train()
    # rollout: 4 steps x 8 samples; re-scoring the kept 4 (int(0.6 * 3) = 1 trained step), then the loss on them
    assert sizes == [8] * 4 + [4] * 1 + [4] * 1
    logs = trainer.state.log_history[0]
    assert logs["ratio/min"] == 1 and logs["ratio/max"] == 1  # exactly: re-scored in the loss's batches


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"best_of_n": 3}, "best_of_n must be an even number from 2 to num_generations - 1"),
        ({"best_of_n": 4}, "best_of_n must be an even number from 2 to num_generations - 1"),
        ({"best_of_n": 2, "num_generations": 2}, "must be an even number from 2 to num_generations - 1"),
        (
            # 3 groups per process, 2 kept of each: 6 samples do not split into 4 micro-steps
            {"best_of_n": 2, "per_device_train_batch_size": 3, "num_generations": 4, "steps_per_generation": 4},
            "set per_device_train_batch_size to a multiple of 2",
        ),
    ],
)
def test_best_of_n_config_errors(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_best_of_n_needs_whole_groups_on_each_process(tmp_path):
    # with several processes a group may straddle two of them; best-of-n selects within a process's own groups
    args = make_config(tmp_path, best_of_n=2)
    args.per_device_train_batch_size = 6  # as if 2 processes x 6 = 12 samples = 3 groups of 4
    with pytest.raises(ValueError, match=r"each process must sample whole groups: .* = 6 must be a multiple of num"):
        args._check_best_of_n()


# -- CFG: one update per prompt batch -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{"steps_per_generation": 2}, {"num_iterations": 2}])
def test_cfg_models_update_once_per_prompt_batch(overrides, tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="with CFG DanceGRPO updates once per prompt batch"):
        make_video_trainer("tiny-wan", tiny_pipeline_path, tmp_path, per_device_train_batch_size=4, **overrides)
    # without CFG a rollout may feed several updates
    trainer = make_video_trainer(
        "tiny-wan", tiny_pipeline_path, tmp_path, per_device_train_batch_size=4, guidance_scale=1.0, **overrides
    )
    assert not trainer.adapter.use_cfg


@pytest.mark.slow
# -- memory ---------------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing(tiny_pipeline_path, tmp_path):
    results = []
    for checkpointing in (False, True):
        trainer = make_video_trainer(
            "tiny-hunyuan-video",
            tiny_pipeline_path,
            tmp_path / str(checkpointing),
            gradient_checkpointing=checkpointing,
            max_steps=1,
            optim="sgd",
            learning_rate=1e-1,
        )
        assert trainer.model.is_gradient_checkpointing == checkpointing
        calls = []
        # a pre-hook: the recomputation in backward stops once it has what it needs, before the forward ends
        trainer.model.transformer_blocks[0].register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        trainer.train()
        results.append((len(calls), torch.cat([p.detach().flatten() for p in trainer.model.parameters()])))
    # 4 rollout steps + int(0.6 * 3) = 1 trained step; checkpointing runs the block again in its backward
    assert results[0][0] == 5 and results[1][0] == 6
    torch.testing.assert_close(results[0][1], results[1][1])


def test_vae_tiling_and_slicing(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path)
    assert not trainer.pipeline.vae.use_tiling and not trainer.pipeline.vae.use_slicing
    trainer = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path, vae_tiling=True, vae_slicing=True)
    assert trainer.pipeline.vae.use_tiling and trainer.pipeline.vae.use_slicing
    videos, _ = trainer.generate(["a cat", "a dog"])
    assert videos.shape == (2, 5, 3, 32, 32) and not videos.requires_grad


# -- sample logging -------------------------------------------------------------------------------------------------
def test_video_samples_are_saved(tiny_pipeline_path, tmp_path):
    # what each tracker receives is tested with the real packages in tests/test_trackers.py
    trainer = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path)
    trainer.train()
    samples = tmp_path / "out" / "_samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000001.gif", "step-000002.gif"]
    with Image.open(samples / "step-000002.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (32, 32)


def test_sample_logging_can_be_turned_off(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path, log_samples=False, max_steps=1)
    trainer.train()
    assert not (tmp_path / "out" / "_samples").exists()


def test_num_frames_config_field():
    assert DanceGRPOConfig(output_dir="unused", num_frames=17).num_frames == 17
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        DanceGRPOConfig(output_dir="unused", num_frames=0)
