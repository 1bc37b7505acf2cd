"""Wan video-to-video (`WanVideoToVideoPipeline`) end to end on a tiny model loaded from disk (32x32 px, 5 frames):
a `video` column, the source noised to the first step `strength` keeps, CFG as the pipeline."""

import math
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_dancegrpo import DanceGRPOConfig
from trl_dancegrpo.rollout import mix_seed

from .test_distributed import assert_two_processes_match_one
from .test_resume import assert_resume_continues_exactly
from .test_trainer import (
    assert_first_step_on_policy,
    assert_lora_round_trip,
    assert_only_trainable_parameters_changed,
    lora_config,
    make_trainer,
    snapshot_parameters,
)
from .test_video import one_thread  # noqa: F401 (fixture)


NAME = "tiny-wan-v2v"
PROMPTS = ["a cat", "a dog", "a car", "a tree"]


def clip(color, frames=5, size=32) -> list:
    """A source video whose frames brighten, so that frame order matters."""
    return [Image.new("RGB", (size, size), tuple(min(255, c + 20 * i) for c in color)) for i in range(frames)]


SOURCES = [clip((200, 40, 40)), clip((40, 180, 60)), clip((30, 60, 200)), clip((120, 120, 120))]


def make_v2v_trainer(tiny_pipeline_path, tmp_path, videos=SOURCES, **overrides):
    overrides.setdefault("num_frames", 5)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "video": list(videos)})
    return make_trainer(tiny_pipeline_path(NAME), tmp_path, dataset=dataset, **overrides)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_v2v_trainer(tiny_pipeline_path, tmp_path, peft_config=lora_config() if use_lora else None)
    assert type(trainer.adapter).__name__ == "WanVideoToVideoAdapter" and trainer.adapter.use_cfg
    assert trainer.adapter.task == "video-to-video"
    before = snapshot_parameters(trainer)
    assert all("lora" in n for n in before["trainable"]) if use_lora else not before["frozen"]
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert_first_step_on_policy(trainer)
    for key in ("rewards/brightness/mean", "advantages/std", "grad_norm", "loss"):
        assert math.isfinite(trainer.state.log_history[0][key]), key


def test_ratio_is_one_with_cfg_in_slices(tiny_pipeline_path, tmp_path):
    trainer = make_v2v_trainer(tiny_pipeline_path, tmp_path, max_steps=1, rollout_batch_size=2, learning_rate=1.0)
    trainer.train()
    assert_first_step_on_policy(trainer)


@pytest.mark.parametrize("strength, kept", [(None, 3), (0.5, 2), (1.0, 4)], ids=["default-0.8", "0.5", "1.0"])
def test_rollout_is_the_pipelines_sampler(strength, kept, tiny_pipeline_path, tmp_path):
    """With eta = 0 and the pipeline drawing the same noise, the trainer reproduces the pipeline's own videos: the
    source's encoding and normalisation, the noising to the first kept sigma, the cut grid, CFG and decoding."""
    trainer = make_v2v_trainer(
        tiny_pipeline_path, tmp_path, num_inference_steps=4, guidance_scale=3.0, strength=strength
    )
    adapter = trainer.adapter
    assert adapter.num_inference_steps == kept and len(adapter.sigmas) == kept + 1
    videos, trajectory = trainer.generate(["a blue house"], seed=0, images=[SOURCES[0]])
    call = dict(prompt="a blue house", video=SOURCES[0], height=32, width=32, output_type="pt", max_sequence_length=16)
    call.update(adapter.pipeline_guidance_arguments())
    assert call["num_inference_steps"] == 4 and call["strength"] == (strength or 0.8)
    expected = trainer.pipeline(**call, generator=torch.Generator().manual_seed(mix_seed(0, 0))).frames
    torch.testing.assert_close(videos, expected, rtol=1e-4, atol=1e-4)
    # the source reaches the rollout's start (the tiny VAE's latents of these clips differ little, and its decoder
    # maps them to nearly the same pixels, so the comparison is on the latents): the start moves by exactly
    # (1 - sigma_0) times the change of the sources' latents
    _, other = trainer.generate(["a blue house"], seed=0, images=[SOURCES[2]])
    with torch.no_grad():
        change = (
            adapter.encode_images([SOURCES[2]])["video_latents"] - adapter.encode_images([SOURCES[0]])["video_latents"]
        )
    moved = other.latents[:, 0] - trajectory.latents[:, 0]
    assert change.abs().max() > 1e-2
    torch.testing.assert_close(moved, (1 - adapter.sigmas[0]) * change, rtol=1e-4, atol=1e-6)


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(NAME)
    trainer = make_v2v_trainer(tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    call = dict(prompt="a blue house", video=SOURCES[1], height=32, width=32, output_type="pt", max_sequence_length=16)
    call.update(trainer.adapter.pipeline_guidance_arguments())
    trained = assert_lora_round_trip(trainer, path, tmp_path / "lora", call, output="frames")
    assert trained.shape == (1, 5, 3, 32, 32)


def test_a_gif_path_is_the_same_video_as_its_frames(tiny_pipeline_path, tmp_path):
    path = tmp_path / "source.gif"
    SOURCES[0][0].save(path, save_all=True, append_images=SOURCES[0][1:], duration=100, loop=0)
    trainer = make_v2v_trainer(tiny_pipeline_path, tmp_path, max_steps=1)
    from_frames, _ = trainer.generate(["a cat"], seed=3, images=[SOURCES[0]])
    from_path, _ = trainer.generate(["a cat"], seed=3, images=[str(path)])
    torch.testing.assert_close(from_path, from_frames)


def test_bad_video_input_is_a_clear_error(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="needs a 'video' column"):
        make_trainer(tiny_pipeline_path(NAME), tmp_path, dataset=Dataset.from_dict({"prompt": PROMPTS}), num_frames=5)
    with pytest.raises(ValueError, match="video file .*missing.gif.* does not exist"):
        make_v2v_trainer(tiny_pipeline_path, tmp_path, videos=[str(tmp_path / "missing.gif")] * 4)
    trainer = make_v2v_trainer(tiny_pipeline_path, tmp_path, max_steps=1, num_frames=9)
    with pytest.raises(ValueError, match="5 frames, fewer than num_frames=9"):
        trainer.generate(["a cat"], images=[SOURCES[0]])
    with pytest.raises(ValueError, match="keeps no step"):
        make_v2v_trainer(tiny_pipeline_path, tmp_path, num_inference_steps=4, strength=0.2)


def test_strength_is_checked_and_refused_elsewhere(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        DanceGRPOConfig(output_dir=str(tmp_path), strength=1.5, report_to="none")
    with pytest.raises(ValueError, match="strength is for video-to-video"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, strength=0.5)


def test_a_text_to_video_checkpoint_trains_video_to_video_with_pipeline_class(tiny_pipeline_path, tmp_path):
    """The published Wan checkpoints are text-to-video: `pipeline_class` builds the video-to-video pipeline from their
    components (the same modules), as `WanVideoToVideoPipeline.from_pretrained(<t2v id>)` does."""
    dataset = Dataset.from_dict({"prompt": PROMPTS, "video": SOURCES})
    path = tiny_pipeline_path("tiny-wan")
    trainer = make_trainer(path, tmp_path, dataset=dataset, num_frames=5, pipeline_class="WanVideoToVideoPipeline")
    assert type(trainer.pipeline).__name__ == "WanVideoToVideoPipeline"
    assert type(trainer.adapter).__name__ == "WanVideoToVideoAdapter"
    # the model card loads the checkpoint in the trained class (`DiffusionPipeline` would give the text-to-video one)
    trainer.create_model_card()
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert f'WanVideoToVideoPipeline.from_pretrained(\n    "{os.path.abspath(path)}"' in card or (
        f'WanVideoToVideoPipeline.from_pretrained("{os.path.abspath(path)}"' in card
    ), card
    assert "from diffusers import WanVideoToVideoPipeline" in card and "DiffusionPipeline" not in card
    with pytest.raises(ValueError, match="pipeline_class='NoSuchPipeline' is not a supported pipeline"):
        make_trainer(path, tmp_path, dataset=dataset, pipeline_class="NoSuchPipeline")
    with pytest.raises(ValueError, match="has no place for .* transformer_2"):
        make_trainer(
            tiny_pipeline_path("tiny-wan22"), tmp_path, dataset=dataset, pipeline_class="WanVideoToVideoPipeline"
        )


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    """A `video` column of clips (CFG on, the source noised to the first kept step) under DDP as in one process."""
    extra = ["--num_frames", "5", "--conditioning", "video"]
    assert_two_processes_match_one(tiny_pipeline_path(NAME), tmp_path, extra)


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True], ids=["lora"])  # full: the shared path, tested on FLUX and Wan 2.2
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", log_samples=False)
    peft = lora_config() if use_lora else None
    assert_resume_continues_exactly(
        lambda out: make_v2v_trainer(tiny_pipeline_path, out, peft_config=peft, **settings), tmp_path
    )
