"""LTX-2 (`LTX2Pipeline`, text to video with audio) on a tiny model loaded from disk (32x32 px, 5 frames at 24 fps,
stereo audio at 16 kHz): the video and audio latents denoised together, the pipeline's guidance, the audio reaching the
rewards and the logged samples, LoRA in diffusers' format, two processes, resuming, and two-sided learning.
`LTX2ConditionPipeline` (a first-frame image): its clean condition tokens, the step and log-prob over the generated
tokens only, the pipeline's own samples, LoRA, two processes and resuming."""

import math
import os
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from trl_dancegrpo.rewards import audio_loudness, brightness
from trl_dancegrpo.rollout import mix_seed
from trl_dancegrpo.sde import flow_grpo_noise_level, flow_sde_step_with_logprob

from .test_resume import StopAt, params
from .test_trainer import (
    assert_first_step_on_policy,
    assert_only_trainable_parameters_changed,
    lora_config,
    snapshot_parameters,
)
from .test_video import COLORS, PROMPTS, make_video_trainer, one_thread, solid  # noqa: F401 (fixture)


NAME, CONDITION = "tiny-ltx2", "tiny-ltx2-condition"
CALL = dict(prompt="a blue house", height=32, width=32, num_frames=5, output_type="pt", max_sequence_length=16)


def make_ltx2_trainer(tiny_pipeline_path, tmp_path, name=NAME, **overrides):
    if name == CONDITION and "dataset" not in overrides:  # one first-frame image per row (solid colours)
        from datasets import Dataset

        images = [solid(COLORS[i % len(COLORS)]) for i in range(len(PROMPTS))]
        overrides["dataset"] = Dataset.from_dict({"prompt": PROMPTS, "image": images})
    return make_video_trainer(name, tiny_pipeline_path, tmp_path, **overrides)


def pipeline_output(trainer, pipeline=None, seed=0, **extra):
    """The pipeline's own video and audio for CALL with the trainer's settings, from the noise of sample 0."""
    adapter = trainer.adapter
    call = {**CALL, "num_inference_steps": adapter.num_inference_steps, **adapter.pipeline_guidance_arguments()}
    call["spatio_temporal_guidance_blocks"] = list(adapter.spatio_temporal_guidance_blocks)
    output = (pipeline or trainer.pipeline)(**call, **extra, generator=torch.Generator().manual_seed(seed))
    return output.frames, output.audio.float().clamp(-1, 1)


def first_frame_condition(image):
    from diffusers.pipelines.ltx2 import LTX2VideoCondition

    return {"conditions": [LTX2VideoCondition(frames=image, index=0)]}


@pytest.mark.parametrize("name", [NAME, CONDITION])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(use_lora, name, tiny_pipeline_path, tmp_path):
    seen = {}

    def audio_shape(prompts, images, audio, audio_sample_rate, image=None):  # `image`: the condition's column
        seen["audio"], seen["rate"] = tuple(audio.shape), audio_sample_rate
        return audio_loudness(prompts, images, audio=audio, audio_sample_rate=audio_sample_rate)

    def image_only(prompts, images, image=None):  # no **kwargs: gets no audio
        return brightness(prompts, images)

    trainer = make_ltx2_trainer(
        tiny_pipeline_path,
        tmp_path,
        name,
        peft_config=lora_config() if use_lora else None,
        reward=[image_only, audio_shape],
        max_steps=1,
        num_inference_steps=3,
    )
    assert type(trainer.adapter).__name__ == ("LTX2ConditionAdapter" if name == CONDITION else "LTX2Adapter")
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    assert all("lora" in n for n in before["trainable"]) if use_lora else not before["frozen"]
    if use_lora:  # both streams and the audio-video cross attention carry LoRA
        for part in ("attn1", "audio_attn1", "audio_to_video_attn", "video_to_audio_attn", "audio_ff"):
            assert any(f".{part}." in n for n in before["trainable"]), part
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert_first_step_on_policy(trainer)
    assert seen == {"audio": (8, 2, 68), "rate": 16000}  # (N, channels, samples): 5 frames at 24 fps
    first = trainer.state.log_history[0]
    for key in ("rewards/image_only/mean", "rewards/audio_shape/mean", "loss", "grad_norm"):
        assert math.isfinite(first[key]), key


def test_joint_step_is_each_latents_step_and_logprob_covers_both():
    """One step of the flat `[video, audio]` latent is the two latents' steps with the same sigmas (as the pipeline's
    two schedulers), and its log-prob is the joint Gaussian's, per element: against a float64 reference."""
    generator = torch.Generator().manual_seed(0)
    video, audio = torch.randn(3, 12, 4, generator=generator), torch.randn(3, 5, 4, generator=generator)
    video_v, audio_v = torch.randn(3, 12, 4, generator=generator), torch.randn(3, 5, 4, generator=generator)
    join = lambda a, b: torch.cat([a.flatten(1), b.flatten(1)], dim=1)  # noqa: E731
    sigma, sigma_next, eta = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.6, 0.3, 0.1]), 0.7
    joint = flow_sde_step_with_logprob(join(video_v, audio_v), join(video, audio), sigma, sigma_next, eta)
    next_video, next_audio = joint.prev_sample[:, :48].view(3, 12, 4), joint.prev_sample[:, 48:].view(3, 5, 4)
    video_step = flow_sde_step_with_logprob(video_v, video, sigma, sigma_next, eta, prev_sample=next_video)
    audio_step = flow_sde_step_with_logprob(audio_v, audio, sigma, sigma_next, eta, prev_sample=next_audio)
    torch.testing.assert_close(joint.prev_sample_mean, join(video_step.prev_sample_mean, audio_step.prev_sample_mean))
    # float64 reference of the flow SDE's Gaussian, summed over both latents' elements, per element
    total = 0
    for x, v, x_next in ((video, video_v, next_video), (audio, audio_v, next_audio)):
        x, v, x_next = x.double().flatten(1), v.double().flatten(1), x_next.double().flatten(1)
        s, s_next = sigma.double()[:, None], sigma_next.double()[:, None]
        x0 = x - s * v
        mean = x + (s_next - s) * (v + 0.5 * eta**2 * (x - (1 - s) * x0) / s**2)
        std = eta * torch.sqrt(s - s_next)
        total = total + (-((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(joint.log_prob.double(), total / (48 + 20), rtol=1e-5, atol=1e-5)
    weighted = (video_step.log_prob * 48 + audio_step.log_prob * 20) / 68
    torch.testing.assert_close(joint.log_prob, weighted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", ["defaults", "no-cfg", "plain-cfg"])
def test_rollout_is_the_pipelines_sampler(guidance, tiny_pipeline_path, tmp_path):
    """With eta = 0 the trainer reproduces the pipeline's video and audio: the noise of both latents, the schedule,
    the prompt connectors and each guidance term (CFG per modality, STG, modality isolation, rescale)."""
    trainer = make_ltx2_trainer(tiny_pipeline_path, tmp_path, num_inference_steps=3)
    adapter = trainer.adapter
    adapter.spatio_temporal_guidance_blocks = (0,)  # the tiny transformer has 2 blocks (the default perturbs 28)
    if guidance == "no-cfg":
        adapter.guidance_scale = adapter.audio_guidance_scale = 1.0
    elif guidance == "plain-cfg":
        adapter.stg_scale = adapter.audio_stg_scale = 0.0
        adapter.modality_scale = adapter.audio_modality_scale = 1.0
        adapter.guidance_rescale = adapter.audio_guidance_rescale = 0.0
    assert adapter.use_cfg == (guidance != "no-cfg")
    videos, trajectory = trainer.generate(["a blue house"], seed=0)
    frames, audio = pipeline_output(trainer, seed=mix_seed(0, 0))
    torch.testing.assert_close(videos, frames, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trajectory.extras["audio"], audio, rtol=1e-4, atol=1e-4)
    assert trajectory.extras["audio_sample_rate"] == 16000
    if guidance == "defaults":  # every term changes the result
        adapter.stg_scale = adapter.audio_stg_scale = 0.0
        without_stg, _ = trainer.generate(["a blue house"], seed=0)
        assert (without_stg - videos).abs().max() > 1e-4


def test_schedule_and_layout(tiny_pipeline_path, tmp_path, monkeypatch):
    trainer = make_ltx2_trainer(tiny_pipeline_path, tmp_path, num_inference_steps=3)
    adapter = trainer.adapter
    # video: 4 channels x 3 latent frames x 16 x 16; audio: 2 channels x 5 latent frames x 2 mel bins
    assert adapter.video_shape == (4, 3, 16, 16) and adapter.audio_shape == (2, 5, 2)
    assert adapter.latent_shape == (4 * 3 * 16 * 16 + 2 * 5 * 2,)
    pipeline = trainer.pipeline
    seen, step = [], type(pipeline.scheduler).step

    def record(scheduler, *args, **kwargs):
        seen.append(scheduler.sigmas.clone())
        return step(scheduler, *args, **kwargs)

    monkeypatch.setattr(type(pipeline.scheduler), "step", record)
    pipeline(**CALL, num_inference_steps=3, guidance_scale=1.0, audio_guidance_scale=1.0)
    # both of the pipeline's schedulers (video, and its copy for the audio) step on the adapter's sigmas
    assert len(seen) == 6
    for sigmas in seen:
        torch.testing.assert_close(sigmas.double(), adapter.sigmas.double(), rtol=0, atol=1e-6)


def lora_round_trip(tiny_pipeline_path, tmp_path, name, repo_id, **call):
    """Train a LoRA on `name`, save it and the model card: the trained model's own pipeline output (`call`: extra
    inputs) moved away from the base model's, and the base pipeline with the LoRA loaded through `load_lora_weights`
    reproduces it, video and audio. Returns the card's text and the base pipeline."""
    from huggingface_hub import ModelCard

    trainer = make_ltx2_trainer(
        tiny_pipeline_path, tmp_path, name, peft_config=lora_config(), learning_rate=1e-2, hub_model_id=repo_id
    )
    trainer.train()
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    trainer.create_model_card()
    card = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md")).text
    assert f'pipe.load_lora_weights("{repo_id}")' in card
    assert all(key.startswith("transformer.") for key in load_file(folder / "pytorch_lora_weights.safetensors"))
    trained = pipeline_output(trainer, **call)
    base = DiffusionPipeline.from_pretrained(tiny_pipeline_path(name))
    untouched = pipeline_output(trainer, base, **call)
    base.load_lora_weights(str(folder))
    loaded = pipeline_output(trainer, base, **call)
    for i in range(2):  # video and audio
        assert (trained[i] - untouched[i]).abs().max() > 1e-4
        torch.testing.assert_close(loaded[i], trained[i], rtol=1e-4, atol=1e-5)
    return card, base


def test_lora_round_trip_through_load_lora_weights(tiny_pipeline_path, tmp_path):
    card, _ = lora_round_trip(tiny_pipeline_path, tmp_path, NAME, "user/ltx2-grpo")
    # the example call samples as training did: every guidance term and the frame rate
    assert "guidance_scale=3, stg_scale=1, modality_scale=3, guidance_rescale=0.7, audio_guidance_scale=7" in card
    assert "frame_rate=24" in card


@pytest.mark.parametrize("use_lora", [True], ids=["lora"])  # full: the shared path, tested on FLUX and Wan 2.2
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", num_inference_steps=3)

    def trainer(out):
        return make_ltx2_trainer(tiny_pipeline_path, out, peft_config=lora_config() if use_lora else None, **settings)

    straight = trainer(tmp_path / "straight")
    straight.train()
    first = trainer(tmp_path / "resumed")
    first.add_callback(StopAt(2))
    first.train()
    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    assert torch.equal(params(second), params(straight))


def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    from .test_distributed import SCRIPT, run

    path = tiny_pipeline_path(NAME)
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", "--num_frames", "5"], tmp_path / "one")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run([*launcher, SCRIPT, path, str(tmp_path / "two"), "4", "--num_frames", "5"], tmp_path / "two")
    one = torch.load(single / "rank0.pt")
    two = [torch.load(double / f"rank{r}.pt") for r in (0, 1)]
    advantages = torch.cat([two[0]["advantages"], two[1]["advantages"]])
    torch.testing.assert_close(advantages, one["advantages"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two[0]["params"], two[1]["params"])
    torch.testing.assert_close(two[0]["params"], one["params"], rtol=1e-4, atol=1e-6)


def test_logged_sample_carries_its_audio(tiny_pipeline_path, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logging_dir))
    trainer = make_ltx2_trainer(
        tiny_pipeline_path, tmp_path, max_steps=1, logging_steps=1, log_samples=True, report_to="tensorboard"
    )
    trainer.train()
    trainer.accelerator.end_training()
    events = EventAccumulator(str(logging_dir), size_guidance={"audio": 0, "images": 0})
    events.Reload()
    [clip] = events.Audio("samples_audio")
    assert clip.step == 1 and clip.sample_rate == 16000 and clip.encoded_audio_string[:4] == b"RIFF"
    import wave

    with wave.open(str(tmp_path / "out" / "_samples" / "step-000001.wav")) as saved:
        assert (saved.getnchannels(), saved.getframerate(), saved.getnframes()) == (2, 16000, 68)


def test_wandb_gets_the_samples_audio(tiny_pipeline_path, tmp_path, monkeypatch):
    import glob
    import json
    import time

    pytest.importorskip("wandb")
    from .test_trackers import finish_wandb_run, read_wandb_records, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train("wandb", tiny_pipeline_path, tmp_path, pipeline=NAME, num_frames=5, max_steps=1, num_inference_steps=2)
    run_dir = finish_wandb_run()
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    for _ in range(300):  # wandb's service process writes the file: wait for the run's exit record
        records = read_wandb_records(run_file)
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.1)
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]
    [row] = [row for row in history if "samples_audio/_type" in row]
    assert row["samples_audio/_type"] == "audio-file" and row["samples/_type"] == "video-file"
    assert len(glob.glob(os.path.join(run_dir, "files", "media", "audio", "samples_audio_*.wav"))) == 1


def test_clear_errors(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames = 1 \+ 2 \* k"):
        make_ltx2_trainer(tiny_pipeline_path, tmp_path, num_frames=4)
    from trl_dancegrpo.adapters import LTX2Adapter

    with pytest.raises(ValueError, match="height and width divisible by 2, got 33x32"):
        LTX2Adapter(DiffusionPipeline.from_pretrained(tiny_pipeline_path(NAME)), 2, height=33, width=32)


def darkness(prompts, images, **kwargs):
    return [-value for value in brightness(prompts, images)]


def quietness(prompts, images, **kwargs):
    return [-value for value in audio_loudness(prompts, images, **kwargs)]


def guidance_off(adapter) -> None:
    adapter.guidance_scale = adapter.audio_guidance_scale = adapter.modality_scale = adapter.audio_modality_scale = 1.0
    adapter.stg_scale = adapter.audio_stg_scale = adapter.guidance_rescale = adapter.audio_guidance_rescale = 0.0
    assert not adapter.use_cfg


def held_out(trainer) -> tuple[float, float]:
    """Mean brightness and loudness of deterministic samples of unseen prompts and seeds."""
    prompts = ["a blue house", "two birds", "a green field", "the sea"]
    values = []
    for seed in (101, 202):
        videos, trajectory = trainer.generate(prompts, seed=seed)
        loudness = audio_loudness(prompts, videos, **trajectory.extras)
        values.append((sum(brightness(prompts, videos)) / 4, sum(loudness) / 4))
    return tuple(sum(v[i] for v in values) / len(values) for i in range(2))


# Adam lr 1e-2 for 20 steps moved the held-out loudness +0.041 / -0.0064 dB (training seed 42), +0.033 / -0.0064 (seed 1)
LOUDNESS_LR, LOUDNESS_MARGIN = 1e-2, 0.003


@pytest.mark.slow
@pytest.mark.parametrize(
    "rewards, index, optim, learning_rate, margin",
    [
        # brightness, SGD lr 2 for 20 steps: held-out +0.0130 / -0.0119 (training seed 42), +0.0136 / -0.0253 (seed 1)
        pytest.param((brightness, darkness), 0, "sgd", 2.0, 0.005, id="brightness"),
        # loudness (dBFS): the audio is 0.6% of the tiny model's latent elements, so SGD barely moves it (lr 2:
        # +0.0004 dB; lr 100: +0.0026 / -0.0004); Adam scales the audio stream's own parameters up
        pytest.param((audio_loudness, quietness), 1, "adamw_torch", LOUDNESS_LR, LOUDNESS_MARGIN, id="loudness"),
    ],
)
def test_rewards_move_held_out_samples_both_ways(
    rewards, index, optim, learning_rate, margin, tiny_pipeline_path, tmp_path
):
    """Training on a reward moves deterministic samples of unseen prompts and seeds its way; on its negation, the
    other way (the tiny model's guidance off, eta 0.7, every step trained)."""
    from datasets import Dataset

    shifts = {}
    for direction, func in zip(("up", "down"), rewards):
        trainer = make_ltx2_trainer(
            tiny_pipeline_path,
            tmp_path / direction,
            dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a car", "a tree", "a boat", "a bird"]}),
            reward=func,
            per_device_train_batch_size=16,
            max_steps=20,
            optim=optim,
            learning_rate=learning_rate,
            eta=0.7,
            timestep_fraction=1.0,
            num_inference_steps=4,
        )
        guidance_off(trainer.adapter)  # one forward per step: the learning, not the guidance, is tested here
        before = held_out(trainer)[index]
        trainer.train()
        shifts[direction] = held_out(trainer)[index] - before
    assert shifts["up"] > margin, shifts
    assert shifts["down"] < -margin, shifts


# -- LTX2ConditionPipeline: a clean first frame ------------------------------------------------------------------------
@pytest.mark.parametrize("sde_type", ["dancegrpo", "flow_grpo"])
def test_condition_step_and_logprob_cover_only_the_generated_elements(sde_type):
    """The conditioned elements (the first latent frame's tokens, first in the flat latent) are copied through and
    left out of the log-prob: the Gaussian's log-density summed over the generated elements and divided by their
    count, against a float64 reference; counting the conditioned ones gives a different value."""
    from trl_dancegrpo.adapters import LTX2Adapter, LTX2ConditionAdapter

    adapter = LTX2ConditionAdapter.__new__(LTX2ConditionAdapter)  # the step needs only the grid and the mask's size
    adapter.sigmas, adapter.sde_type, adapter.condition_size = torch.tensor([1.0, 0.8, 0.5, 0.0]), sde_type, 120
    generator = torch.Generator().manual_seed(0)
    latents, velocity = torch.randn(3, 400, generator=generator), torch.randn(3, 400, generator=generator)
    velocity[:, :120] = 0  # as the adapter's velocity there (the guided x0 blended back to the clean condition)
    step_index, eta = torch.tensor([0, 1, 2]), 0.7
    step = adapter.step(velocity, latents, step_index, eta, generator=torch.Generator().manual_seed(1))
    assert torch.equal(step.prev_sample[:, :120], latents[:, :120])
    assert (step.prev_sample[:, 120:] - latents[:, 120:]).abs().min() > 0
    # float64 reference: the flow SDE's Gaussian (Flow-GRPO's noise level for `flow_grpo`) on every element
    x, v, x_next = latents.double(), velocity.double(), step.prev_sample.double()
    s, s_next = adapter.sigmas.double()[step_index, None], adapter.sigmas.double()[step_index + 1, None]
    eta_t = eta if sde_type == "dancegrpo" else flow_grpo_noise_level(eta, s.float(), 0.8).double()
    mean = x + (s_next - s) * (v + 0.5 * eta_t**2 * (x - (1 - s) * (x - s * v)) / s**2)
    std = eta_t * torch.sqrt(s - s_next)
    density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    mask = torch.zeros(400, dtype=torch.float64)
    mask[:120] = 1  # the pipeline's conditioning mask: 1 on the conditioned elements
    expected = (density * (1 - mask)).sum(1) / (1 - mask).sum()
    torch.testing.assert_close(step.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # the step of the unmasked LTX-2 adapter scores the same transition over every element: a different value
    counted = LTX2Adapter.step(adapter, velocity, latents, step_index, eta, prev_sample=step.prev_sample).log_prob
    torch.testing.assert_close(counted.double(), density.mean(1), rtol=1e-5, atol=1e-5)
    assert (counted - step.log_prob).abs().min() > 0.05
    torch.testing.assert_close(step.prev_sample_mean[:, 120:].double(), mean[:, 120:], rtol=1e-5, atol=1e-5)
    # re-scoring the stored transition gives the same log-prob
    rescored = adapter.step(velocity, latents, step_index, eta, prev_sample=step.prev_sample)
    torch.testing.assert_close(rescored.log_prob, step.log_prob, rtol=0, atol=0)


@pytest.mark.parametrize("guidance", ["defaults", "no-cfg"])
def test_condition_rollout_is_the_pipelines_sampler(guidance, tiny_pipeline_path, tmp_path):
    """With eta = 0 the trainer reproduces `LTX2ConditionPipeline`'s video and audio for a first-frame image (not
    square: the pipeline's resize and crop, and its default CRF re-compression): the clean condition tokens, the
    per-token timesteps, the blend of the guided x0 with the condition, every guidance term."""
    trainer = make_ltx2_trainer(tiny_pipeline_path, tmp_path, CONDITION, num_inference_steps=3)
    adapter = trainer.adapter
    adapter.spatio_temporal_guidance_blocks = (0,)  # the tiny transformer has 2 blocks (the default perturbs 28)
    if guidance == "no-cfg":
        guidance_off(adapter)
    image = Image.new("RGB", (40, 32), (200, 40, 40))
    image.paste((30, 60, 220), (0, 0, 20, 16))
    videos, trajectory = trainer.generate(["a blue house"], seed=0, images=[image])
    frames, audio = pipeline_output(trainer, seed=mix_seed(0, 0), **first_frame_condition(image))
    torch.testing.assert_close(videos, frames, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trajectory.extras["audio"], audio, rtol=1e-4, atol=1e-4)
    # the conditioned elements are the condition's latents at every step; the others move
    n = adapter.condition_size
    cond = adapter.encode_conditioning(["a blue house"], [image])
    for latents in trajectory.latents.unbind(dim=1):
        assert torch.equal(latents[:, :n], cond["condition_latents"].flatten(1))
    assert (trajectory.latents[:, -1, n:] - trajectory.latents[:, 0, n:]).abs().max() > 0.1
    # the velocity the model gives is the pipeline's: the guided x0 blended back to the condition, zero there
    with torch.no_grad():
        velocity = adapter.predict(trainer.pipeline.transformer, trajectory.latents[:, 1], torch.tensor([1]), cond)
    assert not velocity[:, :n].any() and velocity[:, n:].abs().max() > 0.1
    other, _ = trainer.generate(["a blue house"], seed=0, images=[solid((240, 240, 240))])
    assert (other - videos).abs().max() > 0.05  # the image reaches the video


def test_condition_lora_round_trip_and_card(tiny_pipeline_path, tmp_path):
    condition = first_frame_condition(solid((40, 200, 60)))
    card, base = lora_round_trip(tiny_pipeline_path, tmp_path, CONDITION, "user/ltx2-i2v-grpo", **condition)
    assert type(base).__name__ == "LTX2ConditionPipeline"
    assert "from diffusers.pipelines.ltx2 import LTX2VideoCondition" in card
    assert "pipe(conditions=[LTX2VideoCondition(frames=image, index=0)], prompt=" in card


def test_condition_resume_continues_exactly_with_lora(tiny_pipeline_path, tmp_path):
    from .test_resume import assert_resume_continues_exactly

    settings = dict(max_steps=2, learning_rate=1e-2, save_steps=1, save_strategy="steps", num_inference_steps=3)
    assert_resume_continues_exactly(
        lambda out: make_ltx2_trainer(tiny_pipeline_path, out, CONDITION, peft_config=lora_config(), **settings),
        tmp_path,
        steps=2,
        stop=1,
    )


def test_condition_two_processes_match_one(tiny_pipeline_path, tmp_path):
    from .test_distributed import assert_two_processes_match_one

    extra = ["--num_frames", "5", "--conditioning", "image", "--lora"]
    assert_two_processes_match_one(tiny_pipeline_path(CONDITION), tmp_path, extra)


def test_condition_on_the_ltx2_checkpoint_and_clear_errors(tiny_pipeline_path, tmp_path, monkeypatch):
    from datasets import Dataset

    from trl_dancegrpo.adapters import get_adapter_class
    from trl_dancegrpo.models import resolve_pipeline

    # the recipe's way: the text-to-video checkpoint's modules in LTX2ConditionPipeline (`pipeline_class`)
    pipeline = resolve_pipeline(tiny_pipeline_path(NAME), "LTX2ConditionPipeline")
    assert get_adapter_class(pipeline).__name__ == "LTX2ConditionAdapter"

    with pytest.raises(ValueError, match="image-to-video: train_dataset needs an 'image' column"):
        make_ltx2_trainer(tiny_pipeline_path, tmp_path, CONDITION, dataset=Dataset.from_dict({"prompt": PROMPTS}))
    import diffusers.utils

    from trl_dancegrpo.adapters import LTX2ConditionAdapter

    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path(CONDITION))
    monkeypatch.setattr(diffusers.utils, "is_av_available", lambda: False)
    with pytest.raises(ValueError, match=r"H.264 \(CRF 33\).*pip install av"):
        LTX2ConditionAdapter(pipeline, 2, height=32, width=32, num_frames=5)
    monkeypatch.setattr(LTX2ConditionAdapter, "image_crf", 0)
    assert LTX2ConditionAdapter(pipeline, 2, height=32, width=32, num_frames=5).condition_size == 4 * 16 * 16
