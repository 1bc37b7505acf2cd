"""Configuration of the [`DanceGRPOTrainer`]."""

import math
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config_checks import (
    AGGREGATIONS,
    ALGORITHMS,
    AWM_WEIGHTINGS,
    SDE_TYPES,
    WINDOW_SCHEDULES,
    check_context_parallel,
    check_sde_window,
    check_values,
    parse_reward_kwargs,
    resolve_algorithm_options,
)


__all__ = ["AGGREGATIONS", "ALGORITHMS", "AWM_WEIGHTINGS", "SDE_TYPES", "WINDOW_SCHEDULES", "DanceGRPOConfig"]


# `repr=False`: the dataclass-generated `__repr__` would print `hub_token`; TrainingArguments' own masks it.
@dataclass(repr=False)
class DanceGRPOConfig(TrainingArguments):
    r"""
    Configuration class for the [`DanceGRPOTrainer`].

    Only the parameters specific to DanceGRPO are listed here; for the others see
    [`~transformers.TrainingArguments`]. Defaults follow the public DanceGRPO FLUX recipe (arXiv 2505.07818).

    Parameters:
        > Parameters that control sampling (the rollout)

        num_generations (`int`, *optional*, defaults to `12`):
            Number of samples per prompt (the group size G). The global batch
            (`num_processes * per_device_train_batch_size * steps_per_generation`) must be a multiple of it.
        num_inference_steps (`int`, *optional*, defaults to `16`):
            Number of sampler steps T of each rollout (at least 2). The last step is always deterministic: rewards
            see the clean image (for flow models the last step's `x0` estimate), and it is never trained.
        eta (`float`, *optional*):
            Noise scale of the stochastic steps: the flow SDE's eta for rectified-flow models, DDIM's eta for
            diffusion models. `None` uses the recipe value of the model family for `sde_type="dancegrpo"` (FLUX and
            SkyReels 0.3, Stable Diffusion's DDIM 1.0, HunyuanVideo 0.25, the others 0.3), and the variant's own for
            the others (`"flow_grpo"`: 0.7, `"cps"`: 0.8). Must be > 0; at most 1 for `"cps"`.
        sde_type (`str`, *optional*, defaults to `"dancegrpo"`):
            The stochastic step of rectified-flow models. `"dancegrpo"`: `std = eta * sqrt(sigma - sigma_next)` (the
            paper); `"flow_grpo"`: Flow-GRPO's noise level `eta * sqrt(sigma / (1 - sigma))`, same SDE;
            `"cps"`: coefficients-preserving sampling (arXiv 2509.05952), `std = sigma_next * sin(eta * pi / 2)`.
            Diffusion models (DDIM) have only `"dancegrpo"`.
        sde_window_size (`int`, *optional*):
            Only this many consecutive steps are stochastic and trained; every other step is a deterministic (ODE)
            step and is not trained (MixGRPO, Flow-GRPO-Fast). `None`: every step but the last is stochastic and may be
            trained (DanceGRPO). With `init_same_noise`, the deterministic steps before the window run once per group.
        sde_window_range (`list[int]`, *optional*):
            `[start, end)`: the step indices the window may cover; `None` means `[0, num_inference_steps - 1)`, every
            step but the last.
        sde_window_schedule (`str`, *optional*, defaults to `"random"`):
            Where the window sits in each rollout: `"random"` (a new position per optimizer step, drawn from the seed
            and the step, as Flow-GRPO-Fast) or `"sliding"` (MixGRPO: starts at the range's start and moves one step
            forward every `sde_window_interval` optimizer steps, wrapping around).
        sde_window_interval (`int`, *optional*, defaults to `1`):
            Optimizer steps between two moves of a `"sliding"` window (MixGRPO's shift interval).
        shift (`float`, *optional*):
            Timestep shift of the flow sigmas, `sigma = shift * s / (1 + (shift - 1) * s)` on `s = linspace(1, 0, T+1)`
            (DanceGRPO uses 3 for FLUX). `None` uses the pipeline scheduler's own sigmas. Flow models only.
        guidance_scale (`float`, *optional*):
            Guidance. For models with embedded guidance (FLUX.1-dev) the value fed to the guidance embedding; for the
            others classifier-free guidance, on when > 1 (both branches in one batched forward, in the rollout and in
            the loss). `None` uses the model family's training default: 3.5 for FLUX, 5.0 for Stable Diffusion.
        height (`int`, *optional*):
            Image height in pixels. `None` uses the pipeline's default resolution.
        width (`int`, *optional*):
            Image width in pixels. `None` uses the pipeline's default resolution.
        num_frames (`int`, *optional*):
            Frames per video, for video pipelines (`1 + 4k` for the supported video VAEs). `None` uses the family's
            default: 53 for HunyuanVideo (DanceGRPO's recipe), 97 for SkyReels, 81 for Wan. Image pipelines refuse
            other values than `None` and `1`.
        pipeline_class (`str`, *optional*):
            A diffusers pipeline class to build from the checkpoint's components instead of the one its
            `model_index.json` names, for tasks that share a checkpoint: `"WanVideoToVideoPipeline"` trains video-to-video
            on a Wan 2.1 text-to-video checkpoint. `None` keeps the checkpoint's (or the given pipeline's) class.
        strength (`float`, *optional*):
            Video-to-video only (Wan V2V): how far the source video is noised, as the pipeline's `strength`; the
            rollout runs the last `int(num_inference_steps * strength)` steps of the grid from the source's latents
            noised to that step. `None` uses the pipeline's default 0.8; other pipelines refuse it.
        train_experts (`list[str]`, *optional*):
            For two-expert models (Wan 2.2 A14B): the experts to train, `"transformer"` (high-noise steps) and/or
            `"transformer_2"` (low-noise steps); the other one samples its steps unchanged. `None` trains both. Other
            models refuse it.
        init_same_noise (`bool`, *optional*, defaults to `True`):
            Whether all samples of a group start from the same initial noise (the paper's guard against reward
            hacking). The SDE noise of later steps always differs per sample.
        rollout_batch_size (`int`, *optional*):
            How many samples go through the denoiser at once, in the rollout and when re-scored in the loss. `None`
            means the whole per-device batch. A memory knob: it does not change results.
        overlap_rewards (`bool`, *optional*, defaults to `False`):
            Score each slice of `rollout_batch_size` samples in a background thread while the next slice is sampled.
            Worth it when rewards run on another device or a remote service; rewards are then called once per slice
            instead of once per batch.
        vae_tiling (`bool`, *optional*, defaults to `False`):
            Decode with the VAE's spatial (and, for video VAEs, temporal) tiling (`vae.enable_tiling()`): flat memory
            for large or long videos, slightly slower. Decoding always runs outside the autograd graph.
        vae_slicing (`bool`, *optional*, defaults to `False`):
            Decode one sample at a time (`vae.enable_slicing()`).

        > Parameters that save GPU memory (see `trl-dancegrpo estimate-memory` and docs/multi_gpu_and_memory.md)

        offload_text_encoders (`bool`, *optional*, defaults to `False`):
            Keep the text encoders (and the image encoder of image-to-video models) on the CPU and move them to the
            GPU only while they encode (T5-XXL alone is ~9 GB in bf16). Results are identical; each encoding pays a
            host-to-device copy, which `cache_prompt_embeddings` avoids for prompts seen before.
        cache_prompt_embeddings (`bool`, *optional*, defaults to `False`):
            Encode each distinct prompt (and conditioning image) once and keep its embeddings in CPU memory; later
            rollouts of the same prompt reuse them. Worth it for small prompt sets; results are identical.
        offload_reward_models (`bool`, *optional*, defaults to `False`):
            Keep the model-based rewards (those with `move_to`, such as the built-in ones) on the CPU and move them to
            the GPU only to score. Scores are identical; each scoring pays two copies of the reward model.
        context_parallel_size (`int`, *optional*, defaults to `1`):
            Processes that share each sample and split its sequence (its image or video tokens) for the denoiser's
            forward and backward, through diffusers' context parallelism (`trl_dancegrpo.parallel`). The launched
            processes form `num_processes / context_parallel_size` data-parallel groups of consecutive ranks; the
            processes of one group draw the same prompts and noise, and the update equals the one without it. Must
            divide the number of processes; the denoiser needs a context-parallel plan (FLUX, FLUX.2, Qwen-Image,
            Wan, LTX-Video...). `1`: off.
        context_parallel_type (`str`, *optional*, defaults to `"ulysses"`):
            How attention sees the whole sequence: `"ulysses"` (all-to-all over the heads: the number of attention
            heads must be a multiple of `context_parallel_size`; runs on CPU and GPU) or `"ring"` (key/value chunks
            passed around; needs an attention kernel that returns the log-sum-exp: CUDA only).

        > Parameters that control the rewards

        reward_weights (`list[float]`, *optional*):
            Weight of each reward function. `None` weights them all 1.0.
        multi_objective_aggregation (`str`, *optional*, defaults to `"normalize_then_sum"`):
            How several rewards become one advantage. `"normalize_then_sum"` (the paper): each reward is normalised
            within its group, then the weighted sum is taken. `"sum_then_normalize"`: the weighted sum of raw rewards is
            normalised within the group.
        best_of_n (`int`, *optional*):
            Best-of-n selection (the public HunyuanVideo recipe: G = 24, best-of-8): of the `num_generations` samples
            of each group, train only on the `best_of_n // 2` with the highest and the `best_of_n // 2` with the lowest
            advantage. Advantages keep the statistics of the whole group. Even, below `num_generations`.
            `per_device_train_batch_size` then counts generated samples: each micro-step trains on
            `per_device_train_batch_size * best_of_n / num_generations` of them, and each process must hold whole
            groups. The kept samples are re-scored once (no gradient) so the ratio starts at exactly 1.
        reward_kwargs (`dict[str, dict]`, *optional*):
            Keyword arguments of the rewards given by name in `reward_funcs`, passed to
            `trl_dancegrpo.rewards.get_reward(name, **kwargs)`, e.g. a local checkpoint offline:
            `{"hpsv2.1": {"checkpoint_path": "/models/HPS_v2.1_compressed.pt"}}`. On the command line a JSON string
            (`--reward_kwargs '{"hpsv2.1": {...}}'`), in a YAML recipe a mapping. A name that is not in `reward_funcs`
            is an error.
        reward_timeout (`float`, *optional*):
            Seconds each reward function may take per call (plain, `async` and `overlap_rewards` rewards alike); a
            reward that does not return in time stops training with an error naming it. `None`: no limit.
        reward_retries (`int`, *optional*, defaults to `0`):
            How often a reward call that failed with a transient error (`ConnectionError`, a `TimeoutError` of its
            own, other `OSError`s such as a dropped connection to a remote reward) is repeated, after 1, 2, 4...
            seconds; each retry is logged. A call stopped by `reward_timeout` is not retried.

        > Parameters that control the algorithm

        algorithm (`str`, *optional*, defaults to `"grpo"`):
            The objective trained on the rollouts (one rollout, reward and advantage path for all; see docs/math.md).
            `"grpo"`: DanceGRPO's PPO-clip loss on the log-probs of the stochastic sampler's transitions.
            `"grpo_guard"`: GRPO-Guard (arXiv 2510.22319), the same loss on a normalized ratio, centred on 1 at every
            step (the rollout then keeps each transition's mean: one more latent per step and sample), with each
            step's loss weighted by `1 / (sigma - sigma_next)`; flow models with `sde_type` `"dancegrpo"` or
            `"flow_grpo"` only (see `trl_dancegrpo/algorithms/grpo_guard.py`). Its normalized ratio moves about `std`
            times less than GRPO's for the same update, so it wants a smaller `epsilon` (verl-omni's GRPO-Guard docs
            suggest `2e-6`).
            `"nft"`: DiffusionNFT (arXiv 2509.16117), a flow-matching loss on the forward process contrasting an
            implicit positive and negative velocity. `"awm"`: Advantage Weighted Matching (arXiv 2509.25050), the
            pretraining flow-matching loss weighted by the advantage (as a clipped policy-gradient ratio). `"nft"` and
            `"awm"` sample with the deterministic (ODE) solver (no `eta`, no SDE window: what Flow-Factory's NFT and
            AWM recipes do, `dynamics_type: ODE`), keep only the clean final latents and the conditioning, each
            sample from its own initial noise (`init_same_noise` is ignored: a deterministic sampler would make a
            group's samples identical), and train the conditional model without CFG at `int(timestep_fraction * (T -
            1))` sigmas of the sampler's grid per sample, each with fresh noise (Flow-Factory's `"discrete"` timestep
            sampling). Rectified-flow families only; the KL term (`beta`) and `best_of_n` are GRPO's.
        guard_gradient_reweighting (`bool`, *optional*, defaults to `True` with `algorithm="grpo_guard"`):
            With `algorithm="grpo_guard"`, weight each step's loss by `1 / (sigma - sigma_next)` (the paper's gradient
            reweighting, in Flow-Factory's and verl-omni's implementations); `False` keeps only the ratio
            normalization.
        nft_beta (`float`, *optional*, defaults to `1.0` with `algorithm="nft"`):
            DiffusionNFT's beta: the positive velocity is `beta * v_theta + (1 - beta) * v_old`, the negative one
            `(1 + beta) * v_old - beta * v_theta` (paper, eq. 8; 1.0 in Flow-Factory's NFT recipes). The
            advantage becomes the optimality probability `r = 0.5 + 0.5 * clip(A / adv_clip_max, -1, 1)`.
        awm_weighting (`str`, *optional*, defaults to `"ghuber"` with `algorithm="awm"`):
            AWM's time weighting of the matching loss `m = mean((v_theta - (noise - x0))^2)`; the "log-likelihood" is
            `-m` (`"uniform"`), `-sigma * m` (`"sigma"`), `-sigma^2 * m` (`"sigma_squared"`) or the generalised Huber
            `-sigma * ((m + 1e-10)^p - 1e-10^p) / p` (`"ghuber"`, p = `awm_ghuber_power`), as in Flow-Factory's AWM
            recipe that reproduces the paper's PickScore run (SD 3.5 Medium: ghuber, p = 0.25).
        awm_ghuber_power (`float`, *optional*, defaults to `0.25` with `algorithm="awm"`):
            The power p of the `"ghuber"` weighting.
        sample_with_ema (`bool`, *optional*, defaults to `False`):
            `"nft"` and `"awm"` only: sample the rollouts, and compute the old velocities `v_old`, with the EMA of the
            weights (`ema_decay`, required) instead of the trained ones: Flow-Factory's `off_policy`, which its NFT
            FLUX recipe turns on with a fast EMA (decay 0.5, on a ramped schedule; ours is constant). Until the EMA
            starts (`ema_start_step`) the trained weights sample.
        awm_clip_range (`float`, *optional*, defaults to `1.0` with `algorithm="awm"`):
            Clip range of AWM's ratio `exp(log_lik - log_lik_old)` (the same recipe: `clip_range: 1`). On-policy
            (one optimizer step per rollout) the ratio is 1 and the gradient is exactly the advantage-weighted
            matching loss's.

        > Parameters that control the loss

        timestep_fraction (`float`, *optional*, defaults to `0.6`):
            Fraction tau of the stochastic steps trained on. Without a window each sample trains on a random subset of
            `int(tau * (T - 1))` (at least one) of the first `T - 1` steps, as DanceGRPO's code; with `1.0` exactly
            those `T - 1`. With `sde_window_size = k`, on `ceil(tau * k)` of the window's steps (MixGRPO and
            Flow-GRPO-Fast train all of them: 1.0).
        epsilon (`float`, *optional*, defaults to `1e-4`):
            PPO clip range of the probability ratio.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clamped to `[-adv_clip_max, adv_clip_max]`.
        beta (`float`, *optional*, defaults to `0.0`):
            Weight of the KL penalty to the starting model (per step: the squared distance of the two transition
            means over twice the variance). With LoRA the reference is the model with its adapter disabled; with full
            fine-tuning a frozen copy of the denoiser is kept (memory!).
        num_iterations (`int`, *optional*, defaults to `1`):
            Number of passes (PPO epochs) over each rollout.
        steps_per_generation (`int`, *optional*):
            Number of micro-steps one rollout is split over. `None` means `gradient_accumulation_steps`: one rollout
            feeds exactly one optimizer step (on-policy). A larger value reuses a rollout for several optimizer steps;
            with the paper's tiny clip range most ratios then get clipped (watch `clip_ratio` in the logs). With
            classifier-free guidance it must stay `gradient_accumulation_steps` (the paper updates once per prompt
            batch when CFG is on).
        shuffle_dataset (`bool`, *optional*, defaults to `True`):
            Whether to shuffle the prompts.

        > Parameters that control the EMA of the policy

        ema_decay (`float`, *optional*):
            Keep an exponential moving average of the trained weights (with LoRA: the adapter's), as the official
            DanceGRPO scripts do with `--use_ema` (decay 0.995 for FLUX; their HunyuanVideo script sets 0.999 but
            leaves the EMA off). It starts as a float32 copy of the weights and after every optimizer step becomes
            `ema_decay * ema + (1 - ema_decay) * weights`. Saved in every checkpoint and restored on resume;
            `save_model` writes it into `ema/` inside the saved folder, in the format of the main weights
            (`pipe.load_lora_weights(path, subfolder="ema")`). `None`: no EMA.
        ema_start_step (`int`, *optional*, defaults to `0`):
            The EMA starts as a copy of the weights once this many optimizer steps are done (0: at the start).
        ema_on_cpu (`bool`, *optional*, defaults to `False`):
            Keep the EMA in CPU memory instead of on the GPU (it costs 4 bytes per trained parameter; each update then
            copies the weights to the CPU).
        eval_with_ema (`bool`, *optional*, defaults to `False`):
            Evaluate (`evaluate`, `eval_steps`), and draw the model card's samples, with the EMA weights instead of
            the trained ones (once the EMA has started).

        > Parameters that control saving and logging

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a new run in an `output_dir` that holds checkpoints of an earlier run, deleting those checkpoints
            first. Without it (and without `resume_from_checkpoint`) such a folder is refused, so that two runs never
            mix their checkpoints.

        log_samples (`bool`, *optional*, defaults to `True`):
            At each logging step, save the first sample of the latest rollout to `output_dir/_samples/` (an
            animated GIF for videos, a PNG for images; not uploaded by `push_to_hub`) and send it to the `report_to`
            integrations that take media (wandb, TensorBoard, MLflow, Trackio).

    > Defaults changed from [`~transformers.TrainingArguments`]: `learning_rate=1e-5`,
    `lr_scheduler_type="constant"`, `weight_decay=1e-4`, `per_device_train_batch_size=12`, `logging_steps=1`,
    `remove_unused_columns=False` (dataset columns reach the rewards), `bf16=None` (on when a CUDA device supports
    it).
    """

    # Overridden defaults of TrainingArguments
    learning_rate: float = field(default=1e-5, metadata={"help": "The initial learning rate for AdamW."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The scheduler type to use."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay for AdamW."})
    per_device_train_batch_size: int = field(
        default=12, metadata={"help": "Samples (not prompts) per device and micro-step."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: they reach the reward functions as keyword arguments."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 mixed precision. `None`: on when a CUDA device supports it, off otherwise."},
    )

    # Sampling
    num_generations: int = field(default=12, metadata={"help": "Number of samples per prompt (group size G)."})
    num_inference_steps: int = field(default=16, metadata={"help": "Number of sampler steps T per rollout."})
    eta: float | None = field(
        default=None,
        metadata={
            "help": "Noise scale of the SDE (flow) or DDIM eta (diffusion), > 0; None = the family's recipe value."
        },
    )
    sde_type: str = field(
        default="dancegrpo",
        metadata={"help": "Stochastic flow step.", "choices": list(SDE_TYPES)},
    )
    sde_window_size: int | None = field(
        default=None,
        metadata={"help": "Only this many consecutive steps are stochastic and trained; None = all but the last."},
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={"help": "[start, end): the steps the window may cover; None = all but the last."},
    )
    sde_window_schedule: str = field(
        default="random",
        metadata={"help": "Window position per optimizer step.", "choices": list(WINDOW_SCHEDULES)},
    )
    sde_window_interval: int = field(
        default=1, metadata={"help": "Optimizer steps between moves of a sliding window (MixGRPO's shift interval)."}
    )
    shift: float | None = field(
        default=None, metadata={"help": "Flow sigma shift (3 in DanceGRPO's FLUX recipe); None = scheduler's sigmas."}
    )
    guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Embedded guidance (FLUX) or CFG scale (>1 enables CFG); None = the family's default."},
    )
    height: int | None = field(default=None, metadata={"help": "Image height; None = the pipeline's default."})
    width: int | None = field(default=None, metadata={"help": "Image width; None = the pipeline's default."})
    num_frames: int | None = field(
        default=None, metadata={"help": "Frames per video (video pipelines, 1 + 4k); None = the family's default."}
    )
    pipeline_class: str | None = field(
        default=None,
        metadata={"help": "Build this diffusers pipeline class from the checkpoint (e.g. WanVideoToVideoPipeline)."},
    )
    strength: float | None = field(
        default=None,
        metadata={
            "help": "Video-to-video: how far the source video is noised, in (0, 1]; None = 0.8 (the pipeline's)."
        },
    )
    train_experts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Two-expert models (Wan 2.2): experts to train, transformer and/or transformer_2; None = both."
        },
    )
    init_same_noise: bool = field(
        default=True, metadata={"help": "All samples of a group start from the same initial noise."}
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per denoiser forward (rollout and loss); None = the per-device batch. Memory knob."
        },
    )
    overlap_rewards: bool = field(
        default=False,
        metadata={"help": "Score each rollout slice in a background thread while the next slice is sampled."},
    )
    vae_tiling: bool = field(default=False, metadata={"help": "Decode with VAE tiling (flat memory, long videos)."})
    vae_slicing: bool = field(default=False, metadata={"help": "Decode one sample at a time (VAE slicing)."})

    # Memory savers
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "Keep text/image encoders on the CPU; move them to the GPU only to encode."},
    )
    cache_prompt_embeddings: bool = field(
        default=False, metadata={"help": "Encode each distinct prompt once; keep its embeddings in CPU memory."}
    )
    offload_reward_models: bool = field(
        default=False, metadata={"help": "Keep reward models on the CPU; move them to the GPU only to score."}
    )
    context_parallel_size: int = field(
        default=1,
        metadata={"help": "Processes that split each sample's sequence (context parallelism); 1 = off."},
    )
    context_parallel_type: str = field(
        default="ulysses", metadata={"help": "Context parallelism: 'ulysses' (all-to-all) or 'ring' (CUDA only)."}
    )

    # Rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; None = all 1.0."}
    )
    multi_objective_aggregation: str = field(
        default="normalize_then_sum",
        metadata={"help": "How rewards combine: 'normalize_then_sum' (paper) or 'sum_then_normalize'."},
    )
    best_of_n: int | None = field(
        default=None,
        metadata={"help": "Train on the best and the worst best_of_n // 2 samples of each group (e.g. 8 of 24)."},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of rewards named in reward_funcs, as JSON: "
            '\'{"hpsv2.1": {"checkpoint_path": "/models/HPS_v2.1_compressed.pt"}}\'.'
        },
    )
    reward_timeout: float | None = field(
        default=None, metadata={"help": "Seconds each reward call may take; None = no limit."}
    )
    reward_retries: int = field(
        default=0, metadata={"help": "Retries of a reward call after a transient error (ConnectionError, OSError)."}
    )

    # Algorithm
    algorithm: str = field(
        default="grpo",
        metadata={
            "help": "Objective: 'grpo', 'grpo_guard' (GRPO-Guard), 'nft' (DiffusionNFT) or 'awm' (Advantage Weighted "
            "Matching).",
            "choices": list(ALGORITHMS),
        },
    )
    guard_gradient_reweighting: bool | None = field(
        default=None,
        metadata={"help": "grpo_guard (default True): weight each step's loss by 1 / (sigma - sigma_next)."},
    )
    nft_beta: float | None = field(
        default=None, metadata={"help": "nft (default 1.0): DiffusionNFT's beta (implicit positive/negative policy)."}
    )
    awm_weighting: str | None = field(
        default=None,
        metadata={
            "help": "awm (default 'ghuber'): the time weighting of the matching loss.",
            "choices": list(AWM_WEIGHTINGS),
        },
    )
    awm_ghuber_power: float | None = field(
        default=None, metadata={"help": "awm (default 0.25): the power of the 'ghuber' weighting."}
    )
    awm_clip_range: float | None = field(
        default=None, metadata={"help": "awm (default 1.0): the clip range of AWM's likelihood ratio."}
    )
    sample_with_ema: bool = field(
        default=False, metadata={"help": "nft/awm: sample and compute the old velocities with the EMA (ema_decay)."}
    )

    # Loss
    timestep_fraction: float = field(
        default=0.6, metadata={"help": "Fraction of the sampler steps trained on per sample, in (0, 1]."}
    )
    epsilon: float = field(default=1e-4, metadata={"help": "PPO clip range of the probability ratio."})
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages are clamped to +-adv_clip_max."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the starting model (0 = no KL term)."})
    num_iterations: int = field(default=1, metadata={"help": "Passes (PPO epochs) over each rollout."})
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-steps one rollout is split over; None = gradient_accumulation_steps (on-policy)."},
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts."})

    # EMA of the policy
    ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA of the trained weights with this decay (e.g. 0.995); None = off."}
    )
    ema_start_step: int = field(
        default=0, metadata={"help": "Optimizer steps done before the EMA starts as a copy of the weights."}
    )
    ema_on_cpu: bool = field(default=False, metadata={"help": "Keep the EMA in CPU memory instead of on the GPU."})
    eval_with_ema: bool = field(
        default=False, metadata={"help": "Evaluate and draw the model card's samples with the EMA weights."}
    )

    # Saving and logging
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir holding another run's checkpoints (they are deleted)."},
    )
    log_samples: bool = field(
        default=True,
        metadata={
            "help": "Save (output_dir/_samples/) and report a sample of the latest rollout at each logging step."
        },
    )

    def __post_init__(self):
        check_values(self)  # first: a wrong value is reported before transformers sets anything up
        resolve_algorithm_options(self)  # the chosen algorithm's unset options take their defaults
        window_range = check_sde_window(self)
        if window_range is not None:
            self.sde_window_range = window_range
        self.reward_kwargs = parse_reward_kwargs(self.reward_kwargs)
        if self.bf16 is None:
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        with warnings.catch_warnings():
            # `gradient_checkpointing` is our documented name (every transformers 5.x has it); late 5.x releases call
            # it a deprecated alias of `activation_checkpointing`, which earlier ones lack: no warning on every run
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            super().__post_init__()

        _ = self.device  # sets up the distributed state, so that `world_size` counts the launched processes
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be at least 1, got {self.steps_per_generation}.")
        check_context_parallel(
            self.context_parallel_size, self.world_size, self.context_parallel_type, self.device.type
        )
        generation_batch_size = self.generation_batch_size
        if generation_batch_size % self.num_generations:
            raise ValueError(
                f"The global batch of one rollout (data-parallel processes {self.data_parallel_size} x "
                f"per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x steps_per_generation {self.steps_per_generation} = "
                f"{generation_batch_size} samples) must be a multiple of num_generations ({self.num_generations}). "
                "Change per_device_train_batch_size or num_generations."
            )
        if self.device.type == "cpu" and self.dataloader_pin_memory:
            self.dataloader_pin_memory = False  # nothing to pin on a CPU (and torch warns about it on every run)
        if self.fp16 and self.device.type == "cpu":
            raise ValueError(
                "fp16=True needs a GPU: float16 mixed precision is not supported on the CPU. Leave fp16 off (or use "
                "bf16=True where the CPU supports it)."
            )
        if self.best_of_n is not None:
            self._check_best_of_n()

    def _check_best_of_n(self) -> None:
        group, keep = self.num_generations, self.best_of_n
        if keep < 2 or keep % 2 or keep >= group:
            raise ValueError(
                f"best_of_n must be an even number from 2 to num_generations - 1 ({group - 1}), got {keep}: it keeps "
                f"the best_of_n // 2 best and best_of_n // 2 worst samples of each group of {group}."
            )
        local = self.per_device_train_batch_size * self.steps_per_generation
        if local % group:
            raise ValueError(
                f"With best_of_n, each process must sample whole groups: per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x steps_per_generation {self.steps_per_generation} = {local} must "
                f"be a multiple of num_generations ({group})."
            )
        if (self.per_device_train_batch_size * keep) % group:
            raise ValueError(
                f"With best_of_n = {keep} of num_generations = {group}, a micro-step of per_device_train_batch_size "
                f"{self.per_device_train_batch_size} generated samples trains on {self.per_device_train_batch_size} x "
                f"{keep} / {group} of them, which must be a whole number: set per_device_train_batch_size to a "
                f"multiple of {group // math.gcd(group, keep)}."
            )

    @property
    def data_parallel_size(self) -> int:
        """Groups of processes that sample different prompts: `world_size / context_parallel_size`."""
        return self.world_size // self.context_parallel_size

    @property
    def generation_batch_size(self) -> int:
        """Samples in one rollout, over all processes (the processes of a context-parallel group share theirs)."""
        return self.per_device_train_batch_size * self.data_parallel_size * self.steps_per_generation
