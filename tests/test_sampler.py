"""The sampler: the clean last step, the SDE types, SDE windows and the shared prefix, through the real trainer."""

from pathlib import Path

import pytest
import torch
import yaml

from trl_dancegrpo.rollout import denoise, sample_slices
from trl_dancegrpo.tiny import save_tiny_pipeline

from .test_resume import StopAt, params, rewards_by_step
from .test_trainer import assert_first_step_on_policy, make_trainer
from .test_video import make_video_trainer


ROWS = [{"prompt": p} for p in ["a cat"] * 4 + ["a dog"] * 4]


def record_predictions(trainer) -> list[tuple[list[int], bool]]:
    """Wrap the adapter's `predict`: each denoiser forward's step indices and whether it builds a graph."""
    calls, predict = [], trainer.adapter.predict

    def recording(denoiser, latents, step_index, cond):
        calls.append((step_index.tolist(), torch.is_grad_enabled()))
        return predict(denoiser, latents, step_index, cond)

    trainer.adapter.predict = recording
    return calls


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd", "tiny-z-image", "tiny-flux2-klein"])
def test_rewards_see_the_clean_image_of_the_last_step(name, tiny_pipeline_path, tmp_path):
    seen = []

    def reward(prompts, images, **kwargs):
        seen.append(images.clone())
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = make_trainer(tiny_pipeline_path(name), tmp_path, reward=reward, num_inference_steps=4)
    batch = trainer._generate_and_score(ROWS)
    latents, adapter = batch["latents"], trainer.adapter
    assert torch.all(batch["log_probs"][:, -1] == 0) and torch.all(batch["log_probs"][:, :-1] != 0)
    x = latents[:, -2]  # before the last step
    step_index = torch.full((len(ROWS),), 3)
    with torch.no_grad():
        output = denoise(adapter, trainer.denoiser, x, step_index, batch["cond"], batch["negative_cond"])
        if name != "tiny-sd":  # the x0 estimate of the last step, x - sigma * v
            clean = x - adapter.sigmas[3] * output
        else:  # DDIM's deterministic last step
            clean = adapter.step(output, x, step_index, 0.0).prev_sample
        expected = adapter.decode(clean)
    torch.testing.assert_close(latents[:, -1], clean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(seen), expected, rtol=1e-5, atol=1e-6)


def test_the_last_step_is_never_trained(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, num_inference_steps=5, timestep_fraction=1.0)
    calls = record_predictions(trainer)
    trainer.train()
    trained = [steps for steps, grad in calls if grad]
    # timestep_fraction=1: exactly the first T - 1 steps of every sample, each once per optimizer step
    assert len(trained) == 4 * 2
    for steps in trained:
        assert len(steps) == 8 and max(steps) <= 3
    per_sample = [sorted(column) for column in zip(*trained[:4])]
    assert all(steps == [0, 1, 2, 3] for steps in per_sample)


@pytest.mark.parametrize("sde_type", ["dancegrpo", "flow_grpo", "cps"])
def test_each_sde_type_starts_on_policy(sde_type, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, max_steps=1, sde_type=sde_type, shift=3.0)
    assert trainer.sampler.eta == {"dancegrpo": 0.3, "flow_grpo": 0.7, "cps": 0.8}[sde_type]
    trainer.train()
    assert_first_step_on_policy(trainer)


def test_eta_defaults_to_the_family_recipe(tiny_pipeline_path, tmp_path):
    assert make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path).sampler.eta == 1.0  # DDIM eta of the SD recipe
    assert make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path).sampler.eta == 0.3
    # DanceGRPO's scripts: HunyuanVideo 0.25, SkyReels-I2V 0.3 (finetune_skyreels_i2v.sh), not HunyuanVideo's
    assert make_video_trainer("tiny-skyreels", tiny_pipeline_path, tmp_path).sampler.eta == 0.3
    assert make_video_trainer("tiny-hunyuan-video", tiny_pipeline_path, tmp_path).sampler.eta == 0.25
    recipe = yaml.safe_load((Path(__file__).parent.parent / "examples/recipes/skyreels_i2v.yaml").read_text())
    assert (recipe["eta"], recipe["shift"]) == (0.3, 7.0)
    assert make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, eta=0.5).sampler.eta == 0.5


def test_ddim_models_take_only_their_own_step(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="sde_type='cps' is not available for StableDiffusionPipeline"):
        make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path, sde_type="cps")


def test_window_steps_alone_are_stochastic_and_trained(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        num_inference_steps=6,
        sde_window_size=2,
        sde_window_range=[2, 5],
        timestep_fraction=1.0,
        max_steps=1,
    )
    calls = record_predictions(trainer)
    trainer.train()
    start = int(trainer.state.log_history[0]["sde_window/start"])
    window = range(start, start + 2)
    assert 2 <= window.start <= 3
    rollout = [steps for steps, grad in calls if not grad]
    trained = [steps for steps, grad in calls if grad]
    # the prefix (steps before the window) runs on one row per group: 2 groups of 4
    assert [len(steps) for steps in rollout] == [2] * window.start + [8] * (6 - window.start)
    assert [steps[0] for steps in rollout] == list(range(6))
    assert len(trained) == 2 and all(set(steps) <= set(window) for steps in trained)
    assert {s for steps in trained for s in steps} == set(window)


def test_only_window_steps_carry_noise(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, num_inference_steps=6, sde_window_size=2)
    batch = trainer._generate_and_score(ROWS)
    window = trainer.sampler.window(trainer.args.seed, 0)
    stochastic = (batch["log_probs"] != 0).all(dim=0).tolist()
    assert stochastic == [i in window for i in range(6)]
    assert set(batch["train_steps"].flatten().tolist()) <= set(window)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd", "tiny-z-image", "tiny-flux2-klein"])
def test_shared_prefix_gives_the_same_trajectories(name, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(name), tmp_path, num_inference_steps=6, sde_window_size=2)
    prompts = [row["prompt"] for row in ROWS]
    cond, negative = trainer._conditioning(prompts)
    window = range(3, 5)
    kwargs = dict(first=4, seed=7, parts=sample_slices(8, 8, 3), window=window, group_size=4)  # groups span parts
    shared = trainer.sampler.sample(trainer.denoiser, cond, negative, share_prefix=True, **kwargs)
    per_sample = trainer.sampler.sample(trainer.denoiser, cond, negative, share_prefix=False, **kwargs)
    # Not bitwise: the shared prefix runs the denoiser on batches of other shapes (one row per group), and float32
    # kernels split their reductions by batch shape and thread count (with 2 threads the per-sample path alone, in
    # parts of 3 or of 8, differs by as much). Two float32 evaluations of one step differ by a few units of roundoff
    # u = 2^-24 of the largest value they sum, and the steps' differences add up along the trajectory: after k steps
    # the tolerance is (k + 1) * 8 * u * max|x|, elementwise. (Measured: tiny-sd, max|x| 27.5, 2.1e-5 after 6 steps
    # with 2 threads, 0 with 1 thread; the bound there is 9.2e-5. Sharing across groups or prompts would differ by ~1.)
    difference = (shared.latents - per_sample.latents).abs().transpose(0, 1).flatten(1).amax(dim=1)  # per step
    steps_done = torch.arange(len(difference)) + 1
    bound = steps_done * 8 * (torch.finfo(torch.float32).eps / 2) * per_sample.latents.abs().amax()
    assert torch.all(difference <= bound), (difference, bound)
    torch.testing.assert_close(shared.log_probs, per_sample.log_probs, rtol=1e-5, atol=1e-5)
    # samples 4..7 are group 1, 8..11 group 2: identical before the window, different after it
    assert torch.equal(shared.latents[0, 3], shared.latents[3, 3])
    assert not torch.equal(shared.latents[0, 5], shared.latents[1, 5])
    assert not torch.equal(shared.latents[0, 3], shared.latents[4, 3])
    # a group whose samples have different prompts (as `generate` allows) shares only what is really the same
    mixed, _ = trainer._conditioning(["a cat", "a dog", "a cat", "a dog"] * 2)
    shared = trainer.sampler.sample(trainer.denoiser, mixed, negative, share_prefix=True, **kwargs)
    per_sample = trainer.sampler.sample(trainer.denoiser, mixed, negative, share_prefix=False, **kwargs)
    # other batch shapes through the UNet: float32 kernels differ by ~1e-5; sharing across prompts would differ by ~1
    torch.testing.assert_close(shared.latents, per_sample.latents, rtol=1e-4, atol=1e-4)
    assert not torch.equal(shared.latents[0, 3], shared.latents[1, 3])


def test_window_schedules(tiny_pipeline_path, tmp_path):
    common = dict(num_inference_steps=8, sde_window_size=2, sde_window_range=[1, 6])
    sliding = make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, sde_window_schedule="sliding", sde_window_interval=3, **common
    ).sampler
    # starts at the range's start, one step forward every 3 optimizer steps, wraps after the last position (4)
    starts = [sliding.window(0, step).start for step in range(15)]
    assert starts == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 1, 1, 1]
    randomly = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, **common).sampler
    starts = [randomly.window(0, step).start for step in range(40)]
    assert set(starts) == {1, 2, 3, 4}
    assert starts == [randomly.window(0, step).start for step in range(40)]  # a function of (seed, step)
    assert starts != [randomly.window(1, step).start for step in range(40)]


@pytest.mark.slow
def test_resume_with_a_window_continues_exactly(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    settings = dict(
        max_steps=4,
        learning_rate=1e-2,
        save_steps=2,
        save_strategy="steps",
        num_inference_steps=6,
        sde_window_size=2,
        sde_window_schedule="sliding",
    )
    straight = make_trainer(path, tmp_path / "straight", **settings)
    straight.train()
    first = make_trainer(path, tmp_path / "resumed", **settings)
    first.add_callback(StopAt(2))
    first.train()
    second = make_trainer(path, tmp_path / "resumed", **settings)
    second.train(resume_from_checkpoint=True)
    assert torch.equal(params(second), params(straight))
    assert {**rewards_by_step(first), **rewards_by_step(second)} == rewards_by_step(straight)
    windows = [log["sde_window/start"] for log in straight.state.log_history if "sde_window/start" in log]
    assert windows == [0, 1, 2, 3]


@pytest.mark.parametrize("guidance_scale", [None, 4.0], ids=["default-no-cfg", "cfg"])
def test_flux_without_guidance_embedding_samples_as_the_pipelines_true_cfg(guidance_scale, tmp_path):
    """A FLUX transformer without a guidance embedding (FLUX.1-schnell, the shapes yardstick) is guided by true CFG:
    from the same initial noise the trainer's deterministic sampler equals `FluxPipeline.__call__` with the arguments
    the adapter names (`true_cfg_scale` and the empty negative prompt; `guidance_scale` does nothing there)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipeline = FluxPipeline.from_pretrained(save_tiny_pipeline("tiny-flux", str(tmp_path / "embedded")))
    config = {**pipeline.transformer.config, "guidance_embeds": False}
    torch.manual_seed(0)
    pipeline.transformer = FluxTransformer2DModel.from_config(config)
    pipeline.save_pretrained(tmp_path / "unguided")
    guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    trainer = make_trainer(str(tmp_path / "unguided"), tmp_path / "out", **guidance)
    adapter = trainer.adapter
    # unset, the pipeline's own default (true_cfg_scale 1: no CFG), not FLUX.1-dev's embedded 3.5
    assert not adapter.embedded_guidance and adapter.use_cfg == (guidance_scale is not None)
    images, trajectory = trainer.generate(["a blue house"], seed=3)
    call = dict(
        prompt="a blue house",
        height=adapter.height,
        width=adapter.width,
        num_inference_steps=adapter.num_inference_steps,
        latents=trajectory.latents[:, 0],
        output_type="pt",
        max_sequence_length=pipeline.tokenizer_2.model_max_length,
    )
    expected = trainer.pipeline(**call, **adapter.pipeline_guidance_arguments()).images
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    if guidance_scale is not None:  # the guidance reaches the samples: the match above means something
        unguided = trainer.pipeline(**call, true_cfg_scale=1.0).images
        assert (unguided - expected).abs().max() > 1e-3
