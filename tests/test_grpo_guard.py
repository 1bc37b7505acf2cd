"""GRPO-Guard (`algorithm="grpo_guard"`, arXiv 2510.22319): its normalized ratio and loss against a float64
transcription of the published form, the ratio exactly 1 on-policy, training on the flow families, 2 processes, an
exact resume with the EMA, two-sided learning, and the refusals."""

import math

import pytest
import torch

from trl_dancegrpo import DanceGRPOConfig
from trl_dancegrpo.algorithms.grpo_guard import guard_policy_loss, normalized_log_ratio
from trl_dancegrpo.sde import flow_grpo_step_with_logprob, flow_sde_step_with_logprob

from .test_cli_checks import run_cli
from .test_trainer import assert_only_trainable_parameters_changed, lora_config, make_trainer, snapshot_parameters


def reference_log_ratio(mean, old_mean, prev_sample, std):
    """The published form in float64 (Flow-Factory's `GRPOGuardTrainer`, verl-omni's `GRPOGuardLoss`): the Gaussian
    log-probs' difference plus `||mu - mu_old||^2_mean / (2 s^2)`, times `s`."""
    mean, old_mean, prev_sample, std = (t.double() for t in (mean, old_mean, prev_sample, std))

    def log_prob(mu):
        density = -((prev_sample - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return density.flatten(1).mean(1)

    bias = (mean - old_mean).pow(2).flatten(1).mean(1) / (2 * std.flatten() ** 2)
    return (log_prob(mean) - log_prob(old_mean) + bias) * std.flatten()


def reference_loss(mean, old_mean, prev_sample, std, dt, advantages, epsilon, reweight=True):
    ratio = torch.exp(reference_log_ratio(mean, old_mean, prev_sample, std))
    advantages = advantages.double()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - epsilon, 1 + epsilon))
    return loss / (-dt.double()) if reweight else loss


def random_transitions(batch=6, shape=(4, 3, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    std = torch.rand(batch, generator=generator) * 0.3 + 0.02  # the noise levels of a 16-step grid, eta 0.3..0.7
    old_mean = torch.randn(batch, *shape, generator=generator)
    drift = torch.randn(batch, *shape, generator=generator) * 0.02 * torch.rand(batch, 1, 1, 1, generator=generator)
    prev_sample = old_mean + std.view(-1, 1, 1, 1) * torch.randn(batch, *shape, generator=generator)
    dt = -(torch.rand(batch, generator=generator) * 0.1 + 0.01)
    advantages = torch.randn(batch, generator=generator)
    return old_mean + drift, old_mean, prev_sample, std.view(-1, 1, 1, 1), dt, advantages


def test_normalized_ratio_and_loss_match_the_published_form():
    mean, old_mean, prev_sample, std, dt, advantages = random_transitions()
    got = normalized_log_ratio(mean, old_mean, prev_sample, std)
    torch.testing.assert_close(
        got.double(), reference_log_ratio(mean, old_mean, prev_sample, std), rtol=1e-5, atol=1e-7
    )
    # centred for every noise level: unlike GRPO's log-ratio, no -||d||^2 / (2 s^2) that grows as the step's std falls
    assert got.abs().max() < 0.02

    # a clip range that cuts some ratios above 1 + eps and some below 1 - eps
    epsilon = got.abs().median().item()
    mean.requires_grad_(True)
    reference_mean = mean.detach().double().requires_grad_(True)
    for reweight in (True, False):
        loss, ratio, log_ratio = guard_policy_loss(
            mean, old_mean, prev_sample, std, dt, advantages, epsilon, gradient_reweighting=reweight
        )
        expected = reference_loss(reference_mean, old_mean, prev_sample, std, dt, advantages, epsilon, reweight)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ratio, log_ratio.exp())
        (grad,) = torch.autograd.grad(loss.sum(), mean)
        (expected_grad,) = torch.autograd.grad(expected.sum(), reference_mean)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-9)
    clipped = ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))
    assert clipped.any() and not clipped.all()
    assert (grad.flatten(1).abs().sum(1)[clipped] == 0).all()  # the clip stops those samples' gradient
    # on-policy (the rollout's own means) the ratio is exactly 1
    same = normalized_log_ratio(old_mean, old_mean.clone(), prev_sample, std)
    assert torch.equal(same, torch.zeros_like(same))


@pytest.mark.parametrize(
    "step", [flow_sde_step_with_logprob, flow_grpo_step_with_logprob], ids=["dancegrpo", "flow_grpo"]
)
def test_the_flow_steps_log_probs_give_the_same_normalized_ratio(step):
    """With the log-probs our flow SDE steps compute (float32), the published form gives our normalized ratio."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    v_old = torch.randn(3, 4, 8, 8, generator=generator)
    v_new = v_old + 0.05 * torch.randn(3, 4, 8, 8, generator=generator)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.2])
    extra = (torch.tensor(0.95),) if step is flow_grpo_step_with_logprob else ()
    old = step(v_old, x, sigma, sigma_next, 0.7, *extra, generator=generator)
    new = step(v_new, x, sigma, sigma_next, 0.7, *extra, prev_sample=old.prev_sample)
    bias = (new.prev_sample_mean - old.prev_sample_mean).pow(2).flatten(1).mean(1) / (2 * new.std_dev.flatten() ** 2)
    published = (new.log_prob - old.log_prob + bias) * new.std_dev.flatten()
    ours = normalized_log_ratio(new.prev_sample_mean, old.prev_sample_mean, old.prev_sample, new.std_dev)
    torch.testing.assert_close(ours, published, rtol=1e-3, atol=1e-5)
    assert ours.abs().min() > 1e-4  # not trivially zero


def ratio_logs(trainer):
    return [
        (log["ratio/min"], log["ratio/max"], log["clip_ratio"])
        for log in trainer.state.log_history
        if "ratio/min" in log
    ]


def test_ratio_is_exactly_one_on_policy(tiny_pipeline_path, tmp_path):
    """Each rollout's first micro-step re-scores the rollout's own means: ratio exactly 1; the second, after an update,
    not. With best-of-n the kept samples' means are recomputed in the loss's batches: exactly 1 again."""
    path = tiny_pipeline_path("tiny-flux")
    guard = dict(algorithm="grpo_guard", epsilon=2e-6, learning_rate=1e-2, log_samples=False)
    trainer = make_trainer(path, tmp_path / "reuse", steps_per_generation=2, max_steps=2, **guard)
    trainer.train()
    (first, second) = ratio_logs(trainer)
    assert first == (1.0, 1.0, 0.0)
    assert second[:2] != (1.0, 1.0)
    assert trainer._buffered_inputs[0]["means"].shape == trainer._buffered_inputs[0]["latents"][:, 1:].shape

    best = make_trainer(path, tmp_path / "best", best_of_n=2, rollout_batch_size=2, max_steps=1, **guard)
    # best-of-n's re-scoring (TrajectorySampler.rescore) rewrites the trained steps' means, not only their log-probs
    batch = best._generate_and_score([{"prompt": p} for p in ["a cat"] * 4 + ["a dog"] * 4])
    rows = torch.arange(batch["train_steps"].shape[0]).unsqueeze(1)
    kept = batch["means"][rows, batch["train_steps"]].clone()
    batch["means"][rows, batch["train_steps"]] = 0
    best.sampler.rescore(best.model, batch, best.args.rollout_batch_size)
    torch.testing.assert_close(batch["means"][rows, batch["train_steps"]], kept)
    best.train()
    assert ratio_logs(best) == [(1.0, 1.0, 0.0)]


def test_refusals(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="sde_type='flow_grpo'"):
        DanceGRPOConfig(output_dir=str(tmp_path), algorithm="grpo_guard", sde_type="cps")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        DanceGRPOConfig(output_dir=str(tmp_path), algorithm="guard")
    with pytest.raises(ValueError, match="is a diffusion model sampled with DDIM"):
        make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path, algorithm="grpo_guard")
    # the command line refuses both before importing torch
    for argv, message in (
        (["--algorithm", "grpo_guard", "--sde_type", "cps"], "sde_type='flow_grpo'"),
        (["--algorithm", "ppo"], "invalid choice: 'ppo'"),
    ):
        result, imported = run_cli("--output_dir", str(tmp_path), *argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert imported == []


@pytest.mark.slow
def test_estimate_memory_counts_the_stored_means(tiny_pipeline_path):
    """GRPO-Guard keeps one more float32 latent per step and sample in the trajectory buffer."""
    from diffusers import DiffusionPipeline

    from trl_dancegrpo.memory import estimate_memory

    from .test_estimate_memory import parse

    path = tiny_pipeline_path("tiny-flux")
    guard = estimate_memory(*parse(["--model_name_or_path", path, "--algorithm", "grpo_guard"]))
    pipeline = DiffusionPipeline.from_pretrained(path)
    side = 32 // pipeline.vae_scale_factor  # the unpacked latent is (in_channels / 4, side, side), float32
    latent = side * side * pipeline.transformer.config.in_channels // 4
    # 4 samples x (5 latents of the 4-step trajectory + 4 means + 4 float32 log-probs); GRPO: without the means
    assert guard.parts["trajectory_buffer"] == 4 * ((latent * 4) * (5 + 4) + 4 * 4)


@pytest.mark.slow  # each flow family once, LoRA and full each on some family (the suite's time budget)
@pytest.mark.parametrize(
    "name, use_lora",
    [("tiny-flux", True), ("tiny-sd3", False), ("tiny-wan", True)],
    ids=["tiny-flux-lora", "tiny-sd3-full", "tiny-wan-lora"],
)
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    extra = {"num_frames": 5} if name == "tiny-wan" else {}
    trainer = make_trainer(
        tiny_pipeline_path(name),
        tmp_path,
        peft_config=lora_config() if use_lora else None,
        algorithm="grpo_guard",
        sde_type="flow_grpo",
        learning_rate=1e-2,
        **extra,
    )
    before = snapshot_parameters(trainer)
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert ratio_logs(trainer)[0] == (1.0, 1.0, 0.0)


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    from .test_distributed import assert_two_processes_match_one

    assert_two_processes_match_one(tiny_pipeline_path("tiny-flux"), tmp_path, ["--algorithm", "grpo_guard"])


@pytest.mark.slow
def test_resume_inside_a_reused_rollout_continues_exactly_with_ema(tiny_pipeline_path, tmp_path):
    """A checkpoint inside a reused rollout carries its means; the resumed run ends on the uninterrupted one's weights
    and EMA."""
    from .test_resume import assert_resume_continues_exactly

    path = tiny_pipeline_path("tiny-flux")
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=1, save_strategy="steps", log_samples=False)
    settings.update(algorithm="grpo_guard", epsilon=2e-6, steps_per_generation=2, ema_decay=0.5)

    def make(out):
        return make_trainer(path, out, peft_config=lora_config(), **settings)

    straight, _, resumed = assert_resume_continues_exactly(make, tmp_path, steps=4, stop=1)
    buffer = torch.load(tmp_path / "resumed" / "out" / "checkpoint-1" / "rollout_buffer.pt")
    assert all(chunk["means"].shape == chunk["latents"][:, 1:].shape for chunk in buffer["chunks"])
    assert resumed.ema.num_updates == straight.ema.num_updates == 4
    for name, value in straight.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[name], value), name


# Margin (mean pixel value in [0, 1]): tiny FLUX, 30 steps, the settings of test_learning's GRPO runs (which move
# +0.030..+0.037 / -0.098..-0.115). GRPO-Guard on Flow-GRPO's step moved +0.0225..+0.0348 / -0.094..-0.110 on seeds 42,
# 1, 2, 3 (on DanceGRPO's step: +0.019..+0.036 / -0.097..-0.107 on seeds 1, 2, 3).
@pytest.mark.slow
def test_brightness_reward_moves_held_out_samples_both_ways(tiny_pipeline_path, tmp_path):
    from .test_learning import brightness_shifts

    shifts = brightness_shifts(
        tiny_pipeline_path("tiny-flux"), tmp_path, max_steps=30, algorithm="grpo_guard", sde_type="flow_grpo"
    )
    assert shifts["up"] > 0.015, shifts
    assert shifts["down"] < -0.015, shifts
