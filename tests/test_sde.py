"""The SDE steps against an independent float64 reference, torch.distributions.Normal and diffusers' own schedulers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from trl_dancegrpo.sde import (
    cps_step_with_logprob,
    ddim_step_with_logprob,
    flow_grpo_step_with_logprob,
    flow_sde_step_with_logprob,
)


SHAPES = {"image": (3, 4, 8, 8), "video": (3, 4, 5, 6, 6)}


def _normal_log_prob(x, mean, std):
    """`torch.distributions.Normal` in float64, averaged over non-batch dims."""
    lp = torch.distributions.Normal(torch.as_tensor(mean), torch.as_tensor(std)).log_prob(torch.as_tensor(x))
    return lp.flatten(1).mean(1).numpy()


def _expand(value, ndim):
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(-1, *([1] * (ndim - 1))) if value.ndim == 1 else value


def flow_reference(v, x, sigma, sigma_next, eta):
    """Float64 numpy transcription of DESIGN.md section 2 (rectified-flow SDE)."""
    s, sn = _expand(sigma, x.ndim), _expand(sigma_next, x.ndim)
    x0 = x - s * v
    score = -(x - (1 - s) * x0) / s**2
    mean = x + (sn - s) * v - 0.5 * eta**2 * score * (sn - s)
    std = eta * np.sqrt(s - sn) * np.ones_like(mean)
    return mean, std


def flow_grpo_reference(v, x, sigma, sigma_next, a, sigma_max):
    """Float64 transcription of Flow-GRPO's SDE step (its `sde_step_with_logprob`, written as in its code)."""
    s, sn = _expand(sigma, x.ndim), _expand(sigma_next, x.ndim)
    dt = sn - s
    std_dev_t = np.sqrt(s / (1 - np.where(s == 1, sigma_max, s))) * a
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t * np.sqrt(-dt) * np.ones_like(mean)


def cps_reference(v, x, sigma, sigma_next, eta):
    """Float64 transcription of coefficients-preserving sampling (arXiv 2509.05952, eq. for the CPS step)."""
    s, sn = _expand(sigma, x.ndim), _expand(sigma_next, x.ndim)
    x0, x1 = x - s * v, x + (1 - s) * v
    std = sn * np.sin(eta * np.pi / 2)
    return x0 * (1 - sn) + x1 * np.sqrt(sn**2 - std**2), std * np.ones_like(x)


def flow_grpo_cps_log_prob(v, x, prev, sigma, sigma_prev, noise_level):
    """Float64 transcription of the CPS branch of Flow-GRPO's `sde_step_with_logprob` (its variable names): the
    log-prob with all constants removed, averaged over all but the batch dimension."""
    sigma, sigma_prev = _expand(sigma, x.ndim), _expand(sigma_prev, x.ndim)
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * np.sqrt(sigma_prev**2 - std_dev_t**2)
    log_prob = -((prev - prev_sample_mean) ** 2)
    return log_prob.mean(axis=tuple(range(1, log_prob.ndim)))


def ddim_reference(scheduler, eps, x, timestep, eta, num_steps):
    alphas = scheduler.alphas_cumprod.double().numpy()
    t = np.atleast_1d(np.asarray(timestep))
    t_prev = t - scheduler.config.num_train_timesteps // num_steps
    a_t = _expand(np.broadcast_to(alphas[t], (x.shape[0],)), x.ndim)
    final = float(scheduler.final_alpha_cumprod)
    a_prev = np.where(t_prev >= 0, alphas[np.clip(t_prev, 0, None)], final)
    a_prev = _expand(np.broadcast_to(a_prev, (x.shape[0],)), x.ndim)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * np.sqrt(var)
    mean = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - std**2) * eps
    return mean, std * np.ones_like(mean)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar_sigma", "per_sample_sigma"])
def test_flow_step_matches_float64_reference(shape, per_sample):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g)
    x = torch.randn(shape, generator=g)
    prev = torch.randn(shape, generator=g)
    eta = 0.3
    if per_sample:
        sigma = torch.tensor([0.9, 0.5, 0.2])
        sigma_next = torch.tensor([0.8, 0.3, 0.0])
    else:
        sigma, sigma_next = 0.7, 0.6
    out = flow_sde_step_with_logprob(v, x, sigma, sigma_next, eta, prev_sample=prev)

    sigma_np = sigma.numpy() if per_sample else sigma
    sigma_next_np = sigma_next.numpy() if per_sample else sigma_next
    mean, std = flow_reference(v.double().numpy(), x.double().numpy(), sigma_np, sigma_next_np, eta)
    np.testing.assert_allclose(out.prev_sample_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std_dev.expand(shape).numpy(), std, rtol=1e-6)
    assert out.log_prob.shape == (shape[0],)
    assert out.log_prob.dtype == torch.float32
    expected = _normal_log_prob(prev.double().numpy(), mean, std)
    np.testing.assert_allclose(out.log_prob.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.prev_sample, prev)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar_timestep", "per_sample_timestep"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_float64_reference(shape, per_sample, eta):
    num_steps = 10
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # as Stable Diffusion's config; with 0, the last step (t=0) has zero variance
    )
    scheduler.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(shape, generator=g)
    x = torch.randn(shape, generator=g)
    prev = torch.randn(shape, generator=g)
    # includes the last step (timestep 1 -> previous < 0 uses final_alpha_cumprod)
    timestep = scheduler.timesteps[[0, 4, 9]] if per_sample else scheduler.timesteps[3]
    out = ddim_step_with_logprob(scheduler, eps, timestep, x, eta, prev_sample=prev)
    mean, std = ddim_reference(scheduler, eps.double().numpy(), x.double().numpy(), timestep.numpy(), eta, num_steps)
    np.testing.assert_allclose(out.prev_sample_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.std_dev.expand(shape).numpy(), std, rtol=1e-5, atol=1e-7)
    expected = _normal_log_prob(prev.double().numpy(), mean, std)
    np.testing.assert_allclose(out.log_prob.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ddim_mean_equals_diffusers_step_without_noise():
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False
    )
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(2)
    eps, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        ours = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=x)
        theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ours.prev_sample_mean, theirs, rtol=1e-5, atol=1e-5)


def test_flow_step_with_eta_zero_is_the_euler_step_of_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    v, x = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    sigmas = scheduler.sigmas
    ours = flow_sde_step_with_logprob(v, x, sigmas[1], sigmas[2], eta=0.0)
    scheduler._step_index = 1  # diffusers' step reads sigmas[step_index] and sigmas[step_index + 1]
    theirs = scheduler.step(v, scheduler.timesteps[1], x).prev_sample
    torch.testing.assert_close(ours.prev_sample, theirs)
    assert torch.all(ours.log_prob == 0)


@pytest.mark.parametrize("step", ["flow", "ddim"])
def test_sampling_then_rescoring_gives_the_same_log_prob_and_the_right_distribution(step):
    shape = (4, 4, 16, 16)
    g = torch.Generator().manual_seed(4)
    out_, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if step == "flow":

        def run(**kw):
            return flow_sde_step_with_logprob(out_, x, 0.8, 0.7, 0.5, **kw)

    else:
        scheduler = DDIMScheduler()
        scheduler.set_timesteps(10)

        def run(**kw):
            return ddim_step_with_logprob(scheduler, out_, scheduler.timesteps[2], x, 1.0, **kw)

    sampled = run(generator=torch.Generator().manual_seed(0))
    rescored = run(prev_sample=sampled.prev_sample)
    torch.testing.assert_close(sampled.log_prob, rescored.log_prob, rtol=0, atol=0)
    # the noise is standard normal: (x_next - mean) / std has mean 0 and variance 1 over 4096 draws
    z = (sampled.prev_sample - sampled.prev_sample_mean) / sampled.std_dev
    assert abs(z.mean().item()) < 0.05 and abs(z.var().item() - 1) < 0.05
    # the expected log-density of a Gaussian sample is -0.5 * log(2 pi e std^2)
    expected = -0.5 * math.log(2 * math.pi * math.e) - torch.log(sampled.std_dev.flatten()).expand(shape[0])
    torch.testing.assert_close(sampled.log_prob, expected, rtol=0, atol=0.05)
    # same generator seed, same sample; another seed, another sample
    again = run(generator=torch.Generator().manual_seed(0))
    other = run(generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.prev_sample, sampled.prev_sample)
    assert not torch.equal(other.prev_sample, sampled.prev_sample)


def test_a_zero_variance_ddim_step_is_deterministic_with_zero_log_prob():
    scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=0)
    scheduler.set_timesteps(10)  # the last timestep is 0 and its "previous" alpha is alphas_cumprod[0] again
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    out = ddim_step_with_logprob(scheduler, x, scheduler.timesteps[-1], x, eta=1.0)
    assert torch.all(out.std_dev == 0)
    assert torch.equal(out.prev_sample, out.prev_sample_mean)
    assert torch.all(out.log_prob == 0)


def test_bfloat16_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(5)
    v, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    prev = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    low = flow_sde_step_with_logprob(v.bfloat16(), x.bfloat16(), 0.5, 0.4, 0.3, prev_sample=prev)
    ref = flow_sde_step_with_logprob(
        v.bfloat16().float(), x.bfloat16().float(), 0.5, 0.4, 0.3, prev_sample=prev.float()
    )
    assert low.log_prob.dtype == torch.float32 and low.prev_sample_mean.dtype == torch.float32
    torch.testing.assert_close(low.log_prob, ref.log_prob)
    sampled = flow_sde_step_with_logprob(v.bfloat16(), x.bfloat16(), 0.5, 0.4, 0.3)
    assert sampled.prev_sample.dtype == torch.bfloat16


def test_per_sample_sigma_of_wrong_length_is_a_clear_error():
    x = torch.zeros(3, 4, 8, 8)
    with pytest.raises(ValueError, match="one entry per sample"):
        flow_sde_step_with_logprob(x, x, torch.tensor([0.5, 0.4]), 0.3, 0.3)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_sde_variants_match_float64_reference(shape, sde_type):
    g = torch.Generator().manual_seed(1)
    v, x, prev = (torch.randn(shape, generator=g) for _ in range(3))
    sigma = torch.tensor([1.0, 0.5, 0.2])  # sigma = 1: Flow-GRPO's next-grid-point rule
    sigma_next = torch.tensor([0.9, 0.3, 0.1])
    args = (v.double().numpy(), x.double().numpy(), sigma.double().numpy(), sigma_next.double().numpy())
    if sde_type == "flow_grpo":
        out = flow_grpo_step_with_logprob(v, x, sigma, sigma_next, 0.7, 0.9, prev_sample=prev)
        mean, std = flow_grpo_reference(*args, 0.7, 0.9)
    else:
        out = cps_step_with_logprob(v, x, sigma, sigma_next, 0.8, prev_sample=prev)
        mean, std = cps_reference(*args, 0.8)
    np.testing.assert_allclose(out.prev_sample_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.std_dev.expand(shape).numpy(), std, rtol=1e-5)
    if sde_type == "flow_grpo":
        expected = _normal_log_prob(prev.double().numpy(), mean, std)
    else:  # Flow-GRPO's CPS objective, not the Gaussian density
        v64, x64, s64, sn64 = args
        expected = flow_grpo_cps_log_prob(v64, x64, prev.double().numpy(), s64, sn64, 0.8)
    np.testing.assert_allclose(out.log_prob.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_cps_ratios_are_flow_grpos_not_the_gaussian_density_ratio():
    """The ratio of two policies' CPS "log-probs" equals Flow-GRPO's; the Gaussian one would be its power 1/(2 s^2)."""
    g = torch.Generator().manual_seed(3)
    v_old, v_new, x = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).float() for _ in range(3))
    v_new = v_old + 0.05 * v_new
    sigma, sigma_next, eta = 0.3, 0.2, 0.8
    sampled = cps_step_with_logprob(v_old, x, sigma, sigma_next, eta, generator=torch.Generator().manual_seed(0))
    rescored = cps_step_with_logprob(v_new, x, sigma, sigma_next, eta, prev_sample=sampled.prev_sample)
    numpy = [t.double().numpy() for t in (v_old, v_new, x, sampled.prev_sample)]
    old = flow_grpo_cps_log_prob(numpy[0], numpy[2], numpy[3], sigma, sigma_next, eta)
    new = flow_grpo_cps_log_prob(numpy[1], numpy[2], numpy[3], sigma, sigma_next, eta)
    ratio = torch.exp(rescored.log_prob - sampled.log_prob).double().numpy()
    np.testing.assert_allclose(ratio, np.exp(new - old), rtol=1e-6)
    std = sigma_next * math.sin(eta * math.pi / 2)
    gaussian_ratio = np.exp((new - old) / (2 * std**2))  # what the true density ratio would be
    assert np.all(np.abs(np.log(gaussian_ratio) - np.log(ratio)) > 10 * np.abs(np.log(ratio)))


def test_flow_grpo_is_the_dancegrpo_step_with_a_per_step_noise_level():
    g = torch.Generator().manual_seed(2)
    v, x = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = flow_grpo_step_with_logprob(v, x, 0.6, 0.5, 0.7, 0.9)
    same = flow_sde_step_with_logprob(v, x, 0.6, 0.5, 0.7 * math.sqrt(0.6 / 0.4), prev_sample=out.prev_sample)
    torch.testing.assert_close(out.prev_sample_mean, same.prev_sample_mean)
    torch.testing.assert_close(out.log_prob, same.log_prob)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "cps"])
def test_sde_variants_sample_rescore_and_reduce_to_euler(sde_type):
    shape = (4, 4, 16, 16)
    g = torch.Generator().manual_seed(5)
    v, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def run(eta, **kw):
        if sde_type == "flow_grpo":
            return flow_grpo_step_with_logprob(v, x, 0.8, 0.7, eta, 0.95, **kw)
        return cps_step_with_logprob(v, x, 0.8, 0.7, eta, **kw)

    sampled = run(0.7, generator=torch.Generator().manual_seed(0))
    rescored = run(0.7, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(sampled.log_prob, rescored.log_prob, rtol=0, atol=0)
    z = (sampled.prev_sample - sampled.prev_sample_mean) / sampled.std_dev
    assert abs(z.mean().item()) < 0.05 and abs(z.var().item() - 1) < 0.05
    # eta = 0: the deterministic Euler step, log-prob 0, and no noise drawn from the generator
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    euler = run(0.0, generator=generator)
    torch.testing.assert_close(euler.prev_sample, x + (0.7 - 0.8) * v, rtol=1e-5, atol=1e-6)
    assert torch.all(euler.log_prob == 0) and torch.equal(generator.get_state(), state)
