"""Stochastic sampler steps with the log-probability of the transition they take.

DanceGRPO needs a stochastic sampler whose every step is a Gaussian transition `x_next ~ N(mean(x), std**2)`, so
that the log-probability of a stored trajectory can be recomputed under the current model. This module holds the two
steps the paper uses and the two rectified-flow variants of the field, as pure functions with no model code:

- [`flow_sde_step_with_logprob`]: rectified flow (FLUX, SD3, HunyuanVideo, SkyReels, Wan), the SDE
  `dz = (u - 0.5 * eta**2 * score) dt + eta dw` discretised on the sigma grid (DanceGRPO, `sde_type="dancegrpo"`);
- [`flow_grpo_step_with_logprob`]: the same SDE with Flow-GRPO's noise level `eta_t = eta * sqrt(sigma / (1 - sigma))`
  (arXiv 2505.05470, `sde_type="flow_grpo"`);
- [`cps_step_with_logprob`]: coefficients-preserving sampling (arXiv 2509.05952, `sde_type="cps"`);
- [`ddim_step_with_logprob`]: diffusion (Stable Diffusion), DDIM with `eta > 0`.

With `eta = 0` every flow step is the deterministic Euler (ODE) step. All of them broadcast over latents of any rank (4-D images, 5-D videos), accept scalar or per-sample `sigma`/`timestep`,
compute in float32 whatever the input dtype, and re-score a given `prev_sample` instead of sampling one.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class SDEStepOutput:
    """Result of one stochastic sampler step.

    Attributes:
        prev_sample (`torch.Tensor`): The next latent `x_next` (sampled, or the one passed in to be re-scored).
        log_prob (`torch.Tensor`): Shape `[batch]`; the mean over all non-batch dimensions of
            `log N(prev_sample; prev_sample_mean, std_dev**2)` (CPS: of `-(prev_sample - prev_sample_mean)**2`, see
            [`cps_step_with_logprob`]). Zero where `std_dev` is zero (deterministic step).
        prev_sample_mean (`torch.Tensor`): The mean of the Gaussian transition, float32.
        std_dev (`torch.Tensor`): Its standard deviation, float32, broadcastable to the latent (`[batch, 1, ...]`).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor


def _per_sample(value, reference: torch.Tensor) -> torch.Tensor:
    """A float32 tensor of `value` shaped `[batch or 1, 1, ..., 1]` so it broadcasts against `reference`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=reference.device)
    if value.ndim > 1:
        raise ValueError(f"Expected a number or a 1-D per-sample tensor, got a tensor of shape {tuple(value.shape)}.")
    if value.ndim == 1 and value.shape[0] not in (1, reference.shape[0]):
        raise ValueError(
            f"A per-sample tensor must have one entry per sample ({reference.shape[0]}), got {value.shape[0]}."
        )
    return value.reshape(-1, *([1] * (reference.ndim - 1)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of `log N(sample; mean, std**2)`, float32; zero where `std == 0`."""
    std = std.expand_as(mean)
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_prob = -((sample.float() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def shift_sigmas(sigma, shift: float):
    """The flow time shift `shift * sigma / (1 + (shift - 1) * sigma)` (SD3, FLUX): `shift > 1` moves times towards
    noise; `sigma` a tensor or a number in [0, 1]."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _sample_or_rescore(mean, std, prev_sample, generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if prev_sample is None and not std.any():
        prev_sample = mean.to(dtype)  # a deterministic step draws no noise (it would consume the generators)
    elif prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(dtype)
    # The log-prob is that of the sample as stored (in the latent dtype), so re-scoring reproduces it exactly.
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def flow_sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """One rectified-flow SDE step from `sigma` to `sigma_next` (DanceGRPO, section 3 of the paper).

    With the velocity `v = model_output` at `(x = sample, sigma)`:

        x0_hat = x - sigma * v
        mean   = x + (sigma_next - sigma) * (v + 0.5 * eta**2 * (x - (1 - sigma) * x0_hat) / sigma**2)
        std    = eta * sqrt(sigma - sigma_next)

    Args:
        model_output (`torch.Tensor`): The predicted velocity, same shape as `sample`.
        sample (`torch.Tensor`): The current latent `x` at noise level `sigma`, any rank `[batch, ...]`.
        sigma (`float` or `torch.Tensor`): Current noise level in (0, 1], a number or one per sample.
        sigma_next (`float` or `torch.Tensor`): Next noise level, `0 <= sigma_next < sigma`.
        eta (`float` or `torch.Tensor`): Noise scale of the SDE, a number or one per sample; `0` gives the
            deterministic (ODE) Euler step.
        prev_sample (`torch.Tensor`, *optional*): A stored next latent to re-score instead of sampling.
        generator (`torch.Generator` or list of them, *optional*): Generator for the step's noise, or one per sample.

    Returns:
        [`SDEStepOutput`]
    """
    x = sample.float()  # the step is computed in float32 even for bf16 latents: the log-prob is tiny differences
    velocity = model_output.float()
    sigma = _per_sample(sigma, x)
    sigma_next = _per_sample(sigma_next, x)
    eta = _per_sample(eta, x)
    x0_hat = x - sigma * velocity
    score_term = 0.5 * eta**2 * (x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + (sigma_next - sigma) * (velocity + score_term)
    std = eta * torch.sqrt((sigma - sigma_next).clamp_min(0))
    prev_sample, log_prob = _sample_or_rescore(mean, std, prev_sample, generator, sample.dtype)
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std)


def flow_grpo_noise_level(eta, sigma, sigma_max) -> torch.Tensor:
    """Flow-GRPO's per-step noise level `eta * sqrt(sigma / (1 - sigma))`.

    At `sigma = 1` the ratio diverges; Flow-GRPO then uses the next grid point `sigma_max` in the denominator,
    `eta * sqrt(1 / (1 - sigma_max))`, and so do we.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32, device=sigma.device)
    return eta * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, sigma_max, sigma)))


def flow_grpo_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    eta: float,
    sigma_max,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """Flow-GRPO's SDE step (`sde_type="flow_grpo"`): [`flow_sde_step_with_logprob`] with the noise level
    `eta_t = eta * sqrt(sigma / (1 - sigma))` of [`flow_grpo_noise_level`], so `std = eta_t * sqrt(sigma - sigma_next)`.

    Args:
        sigma_max (`float` or `torch.Tensor`): The grid's first value below 1, used for `eta_t` at `sigma = 1`.

    The other arguments are those of [`flow_sde_step_with_logprob`]; `eta` is Flow-GRPO's `a` (0.7 in its recipes).
    """
    eta_t = flow_grpo_noise_level(eta, torch.as_tensor(sigma, device=sample.device), sigma_max)
    return flow_sde_step_with_logprob(model_output, sample, sigma, sigma_next, eta_t, prev_sample, generator)


def cps_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """One coefficients-preserving sampling step (CPS, arXiv 2509.05952; `sde_type="cps"`).

    With the predicted clean latent `x0 = x - sigma * v` and predicted noise `x1 = x + (1 - sigma) * v`:

        std  = sigma_next * sin(eta * pi / 2)
        mean = x0 * (1 - sigma_next) + x1 * sqrt(sigma_next**2 - std**2)

    so `x_next = (1 - sigma_next) * x0 + sigma_next * (a unit-variance mix of x1 and fresh noise)` keeps exactly the
    noise level of the grid (the flow SDE adds slightly too much or too little, which shows as noise artefacts).
    `eta` in [0, 1]: 0 is the Euler (ODE) step, 1 replaces the predicted noise by fresh noise.

    The "log-prob" is Flow-GRPO's objective for this step (the CPS branch of its `sde_step_with_logprob`, which the
    CPS paper trains with): `-(x_next - mean)**2` averaged over the non-batch dimensions, without the Gaussian's
    `1 / (2 std**2)` factor and constants. The ratio `exp(new - old)` is then the Gaussian density ratio raised to the
    power `2 std**2`, so `epsilon` clips what it clips in Flow-GRPO's CPS runs. Zero for a deterministic step.

    Arguments as [`flow_sde_step_with_logprob`].
    """
    x = sample.float()
    velocity = model_output.float()
    sigma = _per_sample(sigma, x)
    sigma_next = _per_sample(sigma_next, x)
    eta = _per_sample(eta, x)
    x0_hat = x - sigma * velocity
    x1_hat = x + (1 - sigma) * velocity
    std = sigma_next * torch.sin(eta * math.pi / 2)
    mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
    prev_sample, _ = _sample_or_rescore(mean, std, prev_sample, generator, sample.dtype)
    squared = torch.where(std.expand_as(mean) == 0, torch.zeros_like(mean), (prev_sample.float() - mean) ** 2)
    log_prob = -squared.mean(dim=tuple(range(1, mean.ndim)))
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStepOutput:
    """One DDIM step with `eta > 0` (Song et al., eq. 12) and the log-prob of the transition taken.

    Uses the `alphas_cumprod`, `final_alpha_cumprod`, `prediction_type` and `clip_sample` of a diffusers
    `DDIMScheduler` on which `set_timesteps` was called; the previous timestep is
    `timestep - num_train_timesteps // num_inference_steps`, as in `DDIMScheduler.step`.

        x0_hat   = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev),   std = eta * sqrt(variance)
        mean     = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std**2) * eps

    Args:
        scheduler (`diffusers.DDIMScheduler`): The scheduler, after `set_timesteps`.
        model_output (`torch.Tensor`): The model prediction (epsilon, v or sample, per `prediction_type`).
        timestep (`int` or `torch.Tensor`): The current timestep, a number or one per sample.
        sample (`torch.Tensor`): The current latent, any rank `[batch, ...]`.
        eta (`float` or `torch.Tensor`): DDIM's eta, a number or one per sample; `0` is deterministic DDIM, `1` the
            DDPM-like variance.
        prev_sample (`torch.Tensor`, *optional*): A stored next latent to re-score instead of sampling.
        generator (`torch.Generator` or list of them, *optional*): Generator for the step's noise, or one per sample.

    Returns:
        [`SDEStepOutput`]
    """
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("Dynamic thresholding is not supported; use a scheduler config with `thresholding=False`.")
    if scheduler.num_inference_steps is None:
        raise ValueError("Call `scheduler.set_timesteps(num_inference_steps)` before `ddim_step_with_logprob`.")
    x = sample.float()
    output = model_output.float()
    timestep = torch.as_tensor(timestep, device=x.device).long()
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    alphas_cumprod = scheduler.alphas_cumprod.to(device=x.device, dtype=torch.float32)
    final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=x.device)
    alpha_t = _per_sample(alphas_cumprod[timestep], x)
    alpha_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp_min(0)], final_alpha)
    alpha_prev = _per_sample(alpha_prev, x)
    beta_t = 1 - alpha_t

    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        x0_hat = (x - beta_t.sqrt() * output) / alpha_t.sqrt()
        eps_hat = output
    elif prediction_type == "sample":
        x0_hat = output
        eps_hat = (x - alpha_t.sqrt() * x0_hat) / beta_t.sqrt()
    elif prediction_type == "v_prediction":
        x0_hat = alpha_t.sqrt() * x - beta_t.sqrt() * output
        eps_hat = alpha_t.sqrt() * output + beta_t.sqrt() * x
    else:
        raise ValueError(
            f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'."
        )
    if scheduler.config.clip_sample:  # as DDIMScheduler.step (without `use_clipped_model_output`)
        clip = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-clip, clip)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = _per_sample(eta, x) * variance.clamp_min(0).sqrt()
    mean = alpha_prev.sqrt() * x0_hat + (1 - alpha_prev - std**2).clamp_min(0).sqrt() * eps_hat
    prev_sample, log_prob = _sample_or_rescore(mean, std, prev_sample, generator, sample.dtype)
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, prev_sample_mean=mean, std_dev=std)
