"""DanceGRPOTrainer: GRPO for diffusers pipelines. One rollout feeds `steps_per_generation` micro-steps:

encode (`encoding.PromptEncoder`) -> sample (`rollout.TrajectorySampler`) -> score (the rewards) -> advantages and
best-of-n (`objectives`) -> optimize (`_policy_step`: per trained step, the loss of the `algorithms` module chosen by
`args.algorithm`: GRPO's PPO-clip loss, DiffusionNFT or AWM) -> log. Model construction is
in `models.py`, the dataset checks in `config_checks.py`. `self.model` is the denoiser as `Trainer` wraps it (DDP,
FSDP); `self.denoiser` is the same module unwrapped, for the forwards outside the loss.
"""

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from diffusers.configuration_utils import FrozenDict
from transformers import Trainer, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import logging
from trl.trainer.utils import RepeatSampler

from . import checkpoints
from .adapters import PipelineAdapter
from .algorithms import make_algorithm
from .config import DanceGRPOConfig
from .config_checks import check_dataset, check_image_column, check_reward_weights_count
from .ema import EMA_FOLDER, EMACallback, ema_state_name
from .encoding import PromptEncoder
from .hub import ModelCardCallback, TrackerConfig
from .models import (  # noqa: F401  (cast_module: re-exported)
    cast_module,
    make_adapter,
    on_device_while_used,
    place_frozen_modules,
    prepare_denoiser,
    resolve_pipeline,
    training_dtype,
)
from .objectives import (  # noqa: F401  (compute_advantages, best_of_n_indices: re-exported, importable from here)
    best_of_n_indices,
    compute_advantages,
    rollout_metrics,
)
from .parallel import GroupRepeatSampler, check_context_parallel_support, setup_context_parallel
from .rewards.scoring import RewardScorer, resolve_reward_funcs
from .rollout import TrajectorySampler, index_conditioning, mix_seed, sample_slices, split_batch
from .sharding import save_denoiser_state_dict
from .video import first_audio, load_image, log_sample_to_integrations, save_sample, side_by_side


RewardFunc = Callable[..., list]
logger = logging.get_logger(__name__)
TRAINING_ARGS_JSON = "training_args.json"


class PromptSampler(RepeatSampler):
    """The prompt sampler (which dataset rows each rollout gets; trajectories are `rollout.TrajectorySampler`'s job):
    TRL's `RepeatSampler` whose shuffling depends only on (seed, epoch), not on how often it was iterated before.

    The Trainer calls `set_epoch` at every epoch, so a run resumed from a checkpoint sees the same prompt order as
    one that never stopped.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            self.generator = torch.Generator().manual_seed(mix_seed(self.seed or 0, self.epoch))
        return super().__iter__()


EpochSeededRepeatSampler = PromptSampler  # its earlier name


class DanceGRPOTrainer(Trainer):
    """Trainer for DanceGRPO (arXiv 2505.07818): GRPO on the stochastic sampler of a diffusion or flow model.

    Example:

    ```python
    from datasets import Dataset
    from peft import LoraConfig

    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
    from trl_dancegrpo.rewards import brightness

    dataset = Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]})
    trainer = DanceGRPOTrainer(
        model="black-forest-labs/FLUX.1-dev",
        reward_funcs=["hpsv2.1", brightness],
        args=DanceGRPOConfig(output_dir="flux-dancegrpo", bf16=True),
        train_dataset=dataset,
        peft_config=LoraConfig(r=128, lora_alpha=256),
    )
    trainer.train()
    ```

    Args:
        model (`str` or [`~diffusers.DiffusionPipeline`]):
            The pipeline to fine-tune, or a Hub id / local path loaded with `DiffusionPipeline.from_pretrained`.
            Supported: see `trl_dancegrpo.adapters.supported_pipelines()`. `trainer.model` is its denoiser.
        reward_funcs (`RewardFunc`, `str` or a list of them):
            Callables `f(prompts, images, **kwargs) -> list[float | None]` with `images` a float tensor in [0, 1] of
            shape `(N, 3, H, W)`; other dataset columns arrive as keyword arguments; `None` marks a sample the reward
            does not apply to. `async def` rewards are awaited concurrently. Strings are looked up with
            `trl_dancegrpo.rewards.get_reward` (registry names or dotted import paths).
        args ([`DanceGRPOConfig`], *optional*):
            Configuration; `None` uses the defaults with `output_dir="dancegrpo-output"`.
        train_dataset ([`~datasets.Dataset`]):
            Prompts, in a column named `"prompt"`.
        eval_dataset ([`~datasets.Dataset`], *optional*):
            Prompts for evaluation: one deterministic (eta = 0) sample each, scored by every reward.
        peft_config ([`~peft.LoraConfig`], *optional*):
            LoRA configuration; `target_modules=None` uses the model family's defaults. Without it the whole denoiser
            is trained.
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Callbacks, as for [`~transformers.Trainer`].
    """

    _tag_names = ["trl", "dancegrpo", "diffusers"]

    def __init__(
        self,
        model,
        reward_funcs: RewardFunc | str | list[RewardFunc | str],
        args: DanceGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        peft_config=None,
        callbacks=None,
    ):
        if args is None:
            args = DanceGRPOConfig(output_dir="dancegrpo-output")
        elif not isinstance(args, DanceGRPOConfig):
            raise TypeError(f"args must be a DanceGRPOConfig, got {type(args).__name__}.")
        # rewards first: a misspelt name or missing reward weights must not wait for the pipeline to load
        self.reward_funcs, self.reward_func_names = resolve_reward_funcs(reward_funcs, args.reward_kwargs)
        self.reward_scorer = RewardScorer(
            self.reward_funcs, self.reward_func_names, args.reward_timeout, args.reward_retries
        )
        check_reward_weights_count(args.reward_weights, len(self.reward_funcs))
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_dataset(dataset, name, args)

        self.pipeline = resolve_pipeline(model, args.pipeline_class)
        self.adapter: PipelineAdapter = make_adapter(self.pipeline, args)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_image_column(dataset, name, self.adapter)
        check_context_parallel_support(self.adapter, args)
        self.sampler = TrajectorySampler(
            self.adapter,
            eta=args.eta if args.eta is not None else self.adapter.eta_for(args.sde_type),
            window_size=args.sde_window_size,
            window_range=args.sde_window_range,
            window_schedule=args.sde_window_schedule,
            window_interval=args.sde_window_interval,
            timestep_fraction=args.timestep_fraction,
        )
        self.algorithm = make_algorithm(args, self.adapter, self.sampler)  # before the model is prepared

        set_seed(args.seed)  # the LoRA's random initialisation is reproducible, as the Trainer's own model_init is
        self.is_lora = peft_config is not None
        denoiser = prepare_denoiser(self.adapter, self.adapter.denoiser, peft_config, args)
        super().__init__(
            model=denoiser,
            args=args,
            data_collator=lambda features: features,  # rows stay dicts: prompts and extra columns go to the rewards
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2 and fsdp_plugin.cpu_ram_efficient_loading:
            # accelerate's loader (rank 0 broadcasts the weights after sharding) breaks on a denoiser's root-level
            # parameters (Wan's `scale_shift_table`) and persistent buffers (SD3's `pos_embed`), and saves nothing
            # here: diffusers' `from_pretrained` has already loaded the full model on every process
            fsdp_plugin.cpu_ram_efficient_loading = False
            logger.info("FSDP: fsdp_cpu_ram_efficient_loading is turned off (diffusers loads on every process).")
        if self.is_fsdp_enabled and self.adapter.has_experts:
            # the loss re-scores random steps per sample, so processes would call different experts at once, and FSDP
            # gathers each expert's shards collectively: the processes would wait on each other forever
            raise ValueError(
                f"{type(self.pipeline).__name__} has two experts, which train under DDP (or on one GPU), not FSDP: "
                "launch with a DDP accelerate config (examples/accelerate/ddp.yaml)."
            )
        self.weight_dtype = training_dtype(args)
        place_frozen_modules(self.adapter, self.accelerator.device, self.weight_dtype, args.offload_text_encoders)
        self.prompt_encoder = PromptEncoder(
            self.adapter, self.accelerator.device, args.cache_prompt_embeddings, args.offload_text_encoders
        )
        self._reward_offload_lock = threading.Lock()
        for func in self.reward_funcs:
            if hasattr(func, "set_device"):
                offload = args.offload_reward_models and hasattr(func, "move_to")
                func.set_device("cpu" if offload else self.accelerator.device, self.weight_dtype)
        self.ref_denoiser = None
        if args.beta > 0 and not self.is_lora:
            import copy

            self.ref_denoiser = copy.deepcopy(self.model).requires_grad_(False).eval()
        # the processes of one context-parallel group share samples (parallel.py); the copy above has no hooks yet
        self.data_parallel = setup_context_parallel(self, [self.model, self.ref_denoiser])
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._micro_step = 0
        self._buffered_inputs = None
        self._latest_sample = None  # (prompt, sample) of the latest rollout, for `log_samples`
        denoiser_config = getattr(self.denoiser, "_internal_dict", None)
        if isinstance(denoiser_config, FrozenDict) and not isinstance(denoiser_config, TrackerConfig):
            self.denoiser._internal_dict = TrackerConfig(denoiser_config)
        self._resumed_rollout = None  # the rollout buffer of the checkpoint resumed from, if it holds one
        self.model_card_callback = ModelCardCallback(self)  # the card's samples; with push_to_hub, pushes at the end
        self.add_callback(self.model_card_callback)
        self.ema = None  # the EMA of the trained weights (`ema.PolicyEMA`), built when training begins
        self._ema_resumed_from = None  # the checkpoint whose EMA the next `train()` restores
        if args.ema_decay is not None:
            self.add_callback(EMACallback(self))  # after each optimizer step; before the step's checkpoint

    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoiser to call outside the loss (rollout, reference model, samples).

        Without DDP's wrapper (its forward is for training); under FSDP the sharded model itself, whose forward gathers
        the shards (transformers keeps it in `self.model`; FSDP2 shards the module in place).
        """
        return self.model if self.is_fsdp_enabled else self.accelerator.unwrap_model(self.model)

    # model construction: models.py (resolve_pipeline, make_adapter, prepare_denoiser), shared with estimate-memory
    _make_adapter = staticmethod(make_adapter)

    # -- data -------------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, dataset=None):
        # Each prompt appears num_generations times in a row, and each generation batch is repeated for all the
        # micro-steps that consume it (TRL's GRPO scheme); groups may straddle processes.
        args = self.args
        sampler = PromptSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=args.num_generations,
            batch_size=args.generation_batch_size // args.num_generations,
            repeat_count=args.num_iterations * args.steps_per_generation,
            shuffle=args.shuffle_dataset,
            seed=args.seed,
        )
        block = self._train_batch_size * args.steps_per_generation  # one dataloader batch, for one context group
        return GroupRepeatSampler.wrap(sampler, block, args.context_parallel_size)

    def get_total_train_batch_size(self, args) -> int:
        """Samples per optimizer step over all processes: the processes of a context-parallel group train on the same
        samples, so they count once (transformers divides by its own context-parallel size, which ours does not set;
        the logged `train_samples_per_second` comes from this)."""
        return self._train_batch_size * args.gradient_accumulation_steps * args.data_parallel_size

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("DanceGRPOTrainer: training requires a train_dataset.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # -- rollout and rewards ------------------------------------------------------------------------------------------
    def _conditioning(self, prompts: list[str], images: list | None = None):
        """Conditioning of each sample and the negative one (see `encoding.PromptEncoder`)."""
        return self.prompt_encoder(prompts, images)

    @property
    def _prompt_cache(self) -> dict:
        return self.prompt_encoder.cache

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seed: int = 0,
        eta: float = 0.0,
        group_size: int = 1,
        images=None,
        first: int | None = None,
    ):
        """Sample images (or videos) for `prompts` with the current model (deterministic when `eta=0`).

        Samples `i` and `j` share their initial noise when `i // group_size == j // group_size`; with `eta > 0` every
        step but the last is stochastic. Image-to-video models take one conditioning image per prompt (`images`: PIL
        images, paths or tensors). `first` is the global index of the first sample (its noise); default: this
        process's block, `process_index * len(prompts)`. Returns the images `(N, 3, H, W)` (videos:
        `(N, F, 3, H, W)`) in [0, 1] and the [`~trl_dancegrpo.rollout.Trajectory`].
        """
        cond, negative = self._conditioning(prompts, images)
        outputs = []
        trajectory = self.sampler.sample(
            self.denoiser,
            cond,
            negative,
            first=self.data_parallel.rank * len(prompts) if first is None else first,
            seed=seed,
            parts=sample_slices(len(prompts), self.args.per_device_eval_batch_size, self.args.rollout_batch_size),
            eta=eta,
            group_size=group_size,
            autocast=self.accelerator.autocast,
            on_part=lambda part, part_images, **extras: outputs.append(part_images),
        )
        return torch.cat(outputs), trajectory

    def _score(self, prompts: list[str], images: torch.Tensor, inputs: list[dict], extras: dict | None = None):
        """Rewards `[N, K]` on this process (NaN for `None` and for NaN scores) and the mask of the `None`s; `extras`
        (the adapter's `decode_extras`, e.g. LTX-2's `audio`) go to the rewards with the dataset columns."""
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key != "prompt"}
        columns.update(extras or {})
        with self._rewards_on_device():
            return self.reward_scorer(prompts, images, columns)

    def _rewards_on_device(self):
        """With `offload_reward_models`, the model rewards are on the accelerator only inside this context."""
        rewards = [func for func in self.reward_funcs if hasattr(func, "move_to")]
        if not self.args.offload_reward_models:
            rewards = []
        # overlapping rewards score from a thread, one part at a time
        return on_device_while_used(
            [func.move_to for func in rewards], self.accelerator.device, self._reward_offload_lock
        )

    def _generate_and_score(self, inputs: list[dict]) -> dict:
        args, device = self.args, self.accelerator.device
        prompts = [row["prompt"] for row in inputs]
        seed = mix_seed(args.seed, self._micro_step)  # a new seed per rollout, reproducible from the step
        first = self.data_parallel.rank * len(prompts)
        self.model.eval()
        cond, negative = self._conditioning(prompts, [row.get(self.adapter.conditioning_column) for row in inputs])
        # The rollout goes part by part, each part exactly one slice of the loss (so the ratio starts at 1). With
        # `overlap_rewards`, each part is scored in a background thread while the next one is sampled.
        parts = sample_slices(len(prompts), args.per_device_train_batch_size, args.rollout_batch_size)
        executor = ThreadPoolExecutor(max_workers=1) if args.overlap_rewards else None
        images, scores = [], []

        def on_part(part: slice, part_images: torch.Tensor, **extras) -> None:
            if part.start == 0 and args.log_samples:  # kept for the sample logged at the next logging step
                sample = self._sample_to_log(part_images[0], inputs[0])
                self._latest_sample = (prompts[0], sample, first_audio(extras))
            if executor is not None:
                scores.append(executor.submit(self._score, prompts[part], part_images, inputs[part], extras))
            else:
                images.append(part_images)

        try:
            start = time.perf_counter()
            with self.algorithm.sampling_weights(self):  # NFT, AWM with sample_with_ema: the EMA's weights
                trajectory = self.sampler.rollout(
                    self.denoiser,
                    cond,
                    negative,
                    first=first,
                    seed=seed,
                    parts=parts,
                    window_seed=args.seed,
                    optimizer_step=self._micro_step // args.gradient_accumulation_steps,
                    autocast=self.accelerator.autocast,
                    on_part=on_part,
                    **self.algorithm.rollout_options(),  # the noise scale (NFT, AWM: 0), the initial-noise groups
                )
            rollout_time = time.perf_counter() - start  # sampling and decoding; with overlap, scoring runs meanwhile
            start = time.perf_counter()
            if executor is not None:
                results = [future.result() for future in scores]
                local, not_applicable = (torch.cat(tensors) for tensors in zip(*results))
            else:
                local, not_applicable = self._score(prompts, torch.cat(images), inputs, trajectory.extras)
            reward_time = time.perf_counter() - start  # with overlap: only the wait after the last part
        finally:
            if executor is not None:
                executor.shutdown(wait=True)
        # a None is "not applicable" to that reward; a NaN score means the sample failed: it is skipped and counted
        failed_local = (torch.isnan(local) & ~not_applicable).any(dim=1)
        rewards = self.data_parallel.gather(local.to(device)).cpu()
        failed = self.data_parallel.gather(failed_local.to(device)).cpu()
        if rewards.shape[0] % args.num_generations:
            raise RuntimeError("The gathered batch is not made of whole groups; this is a bug, please report it.")
        if failed.all():
            raise ValueError(
                "The rewards were NaN for every sample of the batch: nothing to learn from. Check the reward functions "
                f"{self.reward_func_names} (a NaN marks a failed sample; return None where a reward does not apply)."
            )
        masked = rewards.clone()
        masked[failed] = float("nan")
        advantages = compute_advantages(
            masked, args.num_generations, self.reward_weights, args.multi_objective_aggregation, args.adv_clip_max
        )
        process_slice = slice(first, first + len(prompts))
        self._log_rollout_metrics(masked, failed, advantages, rollout_time, reward_time)

        if args.sde_window_size is not None:
            self._metrics["train"]["sde_window/start"].append(float(trajectory.window.start))
        batch = {  # what the algorithm keeps of the rollout (GRPO: the trajectory; NFT, AWM: the clean samples)
            **self.algorithm.rollout_batch(trajectory, first, seed, device),
            "advantages": advantages[process_slice].to(device),
            "cond": cond,
            "negative_cond": negative,
        }
        if args.best_of_n:
            keep = best_of_n_indices(advantages[process_slice], args.num_generations, args.best_of_n).to(device)
            batch = {key: value[keep] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            batch["cond"] = index_conditioning(cond, keep)
        return batch

    def _log_rollout_metrics(self, rewards, failed, advantages, rollout_time, reward_time) -> None:
        metrics = self._metrics["train"]
        logged = rollout_metrics(
            rewards, failed, advantages, self.reward_func_names, self.reward_weights, self.args.num_generations
        )
        for key, value in logged.items():
            metrics[key].append(value)
        metrics["timing/rollout"].append(rollout_time)
        metrics["timing/reward"].append(reward_time)

    # -- loss ---------------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # The micro-step counter seeds every rollout; it is re-derived from the (possibly restored) global step at
        # the first micro-step, so a resumed run draws the same noise as one that never stopped.
        self._micro_step = None
        self._buffered_inputs = None
        self._resumed_rollout = None
        self._ema_resumed_from = None
        checkpoints.check_output_dir(self.args, resume_from_checkpoint, self.is_world_process_zero())
        self.accelerator.wait_for_everyone()  # overwrite_output_dir: deleted before any process writes
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        args = self.args
        if self._micro_step is None:
            self._micro_step = self.state.global_step * args.gradient_accumulation_steps
            self._restore_rollout()
        if self._micro_step % (args.steps_per_generation * args.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score(inputs)
            self._buffered_inputs = split_batch(batch, args.steps_per_generation)
            for buffered in self._buffered_inputs:  # GRPO: best-of-n's old log-probs; NFT, AWM: the old velocities
                self.algorithm.prepare_chunk(self, model, buffered)
        chunk = self._buffered_inputs[self._micro_step % args.steps_per_generation]
        self._micro_step += 1
        start = time.perf_counter()
        loss = self._policy_step(model, chunk)
        self._metrics["train"]["timing/train"].append(time.perf_counter() - start)
        return loss

    def _restore_rollout(self) -> None:
        """Continue on the rollout saved with the checkpoint when the resumed step is inside its reuse."""
        saved, self._resumed_rollout = self._resumed_rollout, None
        args = self.args
        if saved is None or self._micro_step % (args.steps_per_generation * args.num_iterations) == 0:
            return
        if saved["step"] != self._micro_step:
            raise ValueError(
                f"The checkpoint's rollout buffer belongs to micro-step {saved['step']}, the resumed run is at "
                f"{self._micro_step}: were gradient_accumulation_steps or steps_per_generation changed? Resume with the "
                "settings of the original run."
            )
        self._buffered_inputs = saved["chunks"]

    def _rollout_buffer_to_save(self) -> list[dict] | None:
        """The buffered rollout if later optimizer steps still train on it (a checkpoint inside its reuse)."""
        args = self.args
        if self._buffered_inputs is None or self._micro_step is None:
            return None
        if self._micro_step % (args.steps_per_generation * args.num_iterations) == 0:
            return None
        return self._buffered_inputs

    def _policy_step(self, model, chunk: dict) -> torch.Tensor:
        """The algorithm's loss on the chosen steps of each sample, one backward per (step, slice): memory stays flat."""
        args = self.args
        num_samples, num_steps = chunk["train_steps"].shape
        slices = sample_slices(num_samples, num_samples, args.rollout_batch_size)
        # set by Trainer's loop (the last accumulation window may be shorter); outside it, the configured value
        accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        scale = 1.0 / (num_samples * num_steps * accumulation)
        total_loss = torch.zeros((), device=self.accelerator.device)
        stats = defaultdict(list)
        model.eval()  # no dropout: see models.prepare_denoiser
        num_backward = num_steps * len(slices)
        for j in range(num_steps):
            for n, s in enumerate(slices):
                last = j * len(slices) + n == num_backward - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync:
                    loss = self.algorithm.step_loss(self, model, chunk, s, j, stats) * scale
                    self.accelerator.backward(loss * self.data_parallel.grad_scale)
                total_loss += loss.detach()
        for key, value in self.algorithm.metrics(stats).items():
            self._metrics["train"][key].append(value)
        return total_loss * accumulation  # reported loss is per micro-step

    # -- logging, evaluation, saving ----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training or "loss" in logs else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs = {**logs, **metrics}
        if "reward" in logs:  # the progress bar shows the latest mean reward
            for callback in self.callback_handler.callbacks:
                if getattr(callback, "training_bar", None) is not None:
                    callback.training_bar.set_postfix(reward=f"{logs['reward']:.4g}", refresh=False)
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if "loss" in logs and self._latest_sample is not None:
            self._log_sample()

    def _sample_to_log(self, sample: torch.Tensor, row: dict) -> torch.Tensor:
        """A sample as logged: as it is, or for editing, the source image and the result side by side."""
        sample = sample.detach().cpu()
        if self.adapter.task == "image-to-image":
            sample = side_by_side(load_image(row["image"], "The logged sample"), sample)
        return sample

    def _log_sample(self, sample=None, name: str = "step") -> None:
        """Save a sample (default: the first of the latest rollout) as `output_dir/_samples/{name}-NNNNNN` (GIF or
        PNG) and report it.

        The leading underscore keeps the folder out of `push_to_hub`'s upload of `output_dir` (transformers skips `_*`).
        """
        if sample is None:
            sample, self._latest_sample = self._latest_sample, None  # each rollout is logged once
        prompt, sample, audio = (*sample, None)[:3]  # audio: (waveform, sample rate) of families that make sound
        if not self.is_world_process_zero():
            return
        step = self.state.global_step
        path = save_sample(sample, os.path.join(self.args.output_dir, "_samples", f"{name}-{step:06d}"), audio=audio)
        log_sample_to_integrations(self.callback_handler.callbacks, path, sample, prompt, step, audio=audio)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Deterministic (eta = 0) samples of the evaluation prompts, scored by every reward.

        Returns (and logs) `{prefix}_rewards/<name>/mean` per reward and, when the dataset has a `category` column,
        `{prefix}_rewards/<name>/<category>/mean` per category. The sampling and scoring are those of
        `trl-dancegrpo evaluate` (`trl_dancegrpo.evaluation.sample_and_score`).
        """
        from .eval_sampling import sample_and_score, summarize

        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("DanceGRPOTrainer: evaluation requires an eval_dataset.")
        rows = list(dataset)
        if not rows:
            raise ValueError("DanceGRPOTrainer: the eval_dataset is empty.")
        with self.eval_weights():
            result = sample_and_score(self, rows, seed=self.args.seed)
        categories = [row["category"] for row in rows] if "category" in rows[0] else None
        summary = summarize(result.rewards, self.reward_func_names, categories)
        metrics = {}
        for name in self.reward_func_names:
            if summary[name] is not None:
                metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = summary[name]
            for category in dict.fromkeys(categories or []):
                if summary[f"{name}/{category}"] is not None:
                    metrics[f"{metric_key_prefix}_rewards/{name}/{category}/mean"] = summary[f"{name}/{category}"]
        self.log(metrics)
        if self.args.log_samples:  # the first evaluation sample, as `_samples/eval-NNNNNN` (editing: with its source)
            # saved by the main process, whose first sample is the first row's
            sample = (rows[0]["prompt"], self._sample_to_log(result.first_sample, rows[0]))
            self._log_sample(sample, name=metric_key_prefix)
        return metrics

    def eval_weights(self):
        """A context in which the model holds the weights to evaluate: the EMA's with `eval_with_ema` (once it has
        started), else the trained ones."""
        use_ema = self.args.eval_with_ema and self.ema is not None and self.ema.started
        return self.ema.applied() if use_ema else contextlib.nullcontext()

    # -- sharing ------------------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Upload the LoRA (diffusers format, for `pipe.load_lora_weights(repo_id)`) or the denoiser, with a model card.

        The repository is `args.hub_model_id`; the card (`README.md`, with samples of fixed prompts before vs. after
        training, the rewards, the settings and how to load the result) and its images are written into
        `args.output_dir`, which is uploaded. Arguments as [`~transformers.Trainer.push_to_hub`]; `kwargs` go to
        [`create_model_card`] (`dataset_name`, `tags`, `license`).
        """
        self.model_card_callback.prepare()  # on every process: sampling a sharded model needs all of them
        return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Write the model card `README.md` and its `images/` into `args.output_dir` (main process only).

        Args:
            model_name (`str`, *optional*): Title of the card; defaults to the repository name.
            dataset_name (`str`, *optional*): Hub id of the prompt dataset, for the card's metadata.
            tags (`str` or `list[str]`, *optional*): Tags added to `dancegrpo`, `diffusers`, `lora`, the model family
                and the task.
            license (`str`, *optional*): License identifier for the metadata (mind the base model's license).
        """
        from .hub import write_model_card

        if not self.is_world_process_zero():
            self.model_card_callback.prepared = None
            return
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers' version uploads `training_args.bin` (it pickles hub_token) and copies transformers' file names
        from .hub import push_from_checkpoint

        push_from_checkpoint(self, checkpoint_folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the LoRA (diffusers format) or the denoiser into `output_dir` (default `args.output_dir`); with an EMA
        (`ema_decay`), its weights too, in the same format, into `output_dir/ema`.

        Under FSDP every process must call it: the shards are gathered first (whatever `fsdp_state_dict_type` is), so
        the folder always holds weights that `load_lora_weights` / `from_pretrained` load.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self._save_weights(output_dir)
        if self.ema is not None and self.ema.started:
            with self.ema.applied():
                self._save_weights(os.path.join(output_dir, EMA_FOLDER))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        elif not _internal_call:  # a push writes the card itself
            self._write_model_card(output_dir)

    def _save_weights(self, output_dir: str) -> None:
        if self.is_fsdp_enabled:
            self._save(output_dir, state_dict=self._gather_trainable_state_dict())
        else:
            super().save_model(output_dir, _internal_call=True)

    def _ema_state_name(self) -> str:
        """This process's EMA file in a checkpoint: one for all, or one per process when FSDP shards it."""
        sharded = self.is_fsdp_enabled and self.accelerator.num_processes > 1
        return ema_state_name(sharded, self.accelerator.process_index)

    def _write_model_card(self, output_dir: str) -> None:
        """The model card (`README.md`, samples before and after, reward curve) next to saved weights, as TRL does."""
        from .hub import write_model_card

        self.model_card_callback.prepare()  # on every process: sampling a sharded model needs all of them
        if self.is_world_process_zero():
            write_model_card(self, output_dir=output_dir)
        self.model_card_callback.prepared = None

    def _gather_trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The complete trainable weights (LoRA: only the adapter's) on the saving process, gathered from FSDP shards.

        A collective: every process calls it. FSDP2 gathers the LoRA tensors one by one instead of the whole model.
        """
        if not self.is_lora:
            return self.accelerator.get_state_dict(self.model)
        from peft.utils import get_peft_model_state_dict

        denoiser = self.accelerator.unwrap_model(self.model)
        if self.accelerator.is_fsdp2:
            from torch.distributed.tensor import DTensor

            lora = get_peft_model_state_dict(denoiser)
            return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in lora.items()}
        state_dict = self.accelerator.get_state_dict(self.model)  # FSDP1: complete on the main process only
        return get_peft_model_state_dict(denoiser, state_dict=state_dict) if self.args.should_save else {}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the trainable weights (`state_dict`: already gathered ones, else the model's own) on the main process."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if self.is_lora:
            from peft.utils import get_peft_model_state_dict

            lora_state_dict = state_dict if state_dict is not None else get_peft_model_state_dict(denoiser)
            metadata = denoiser.peft_config["default"].to_dict()
            self.adapter.save_lora_weights(output_dir, lora_state_dict, metadata)
        elif state_dict is None:
            denoiser.save_pretrained(output_dir)
        else:
            save_denoiser_state_dict(denoiser, state_dict, output_dir)
        # JSON instead of transformers' pickled `training_args.bin`, which holds `hub_token`: this folder gets uploaded
        # by push_to_hub, and `to_json_string` writes every `*_token` field as a placeholder
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())

    def _save_checkpoint(self, model, trial) -> None:
        checkpoints.save_checkpoint(self, trial)  # staged, then renamed into place once complete

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the trainable weights written by `_save`: the LoRA (diffusers format) or the full denoiser.

        First the checkpoint is checked against this run (model family, LoRA rank, alpha and targets, trainable
        parameters); afterwards the loaded weights must be complete and finite. Under FSDP, transformers' loader
        restores the sharded model from the FSDP checkpoint (`pytorch_model_fsdp*`) that every checkpoint also holds
        next to the optimizer.
        """
        checkpoints.verify_manifest(resume_from_checkpoint)  # before any file of it is read
        self._ema_resumed_from = resume_from_checkpoint  # restored when training begins (`ema.EMACallback`)
        state_file = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
        if os.path.isfile(state_file):  # read by transformers later on, where a malformed file is not named
            checkpoints.read_json_file(state_file, resume_from_checkpoint)
        checkpoints.check_compatible(self, resume_from_checkpoint)
        if not self.args.save_only_model:
            checkpoints.warn_missing_state_files(resume_from_checkpoint)
        suffix = f"_{self.accelerator.process_index}" if self.accelerator.num_processes > 1 else ""
        self._resumed_rollout = checkpoints.load_rollout_buffer(
            resume_from_checkpoint, self.accelerator.device, suffix
        )
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self.adapter.load_trained_weights(denoiser, resume_from_checkpoint, self.is_lora)
            checkpoints.check_finite_weights(denoiser, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as error:  # any failure of a garbage file (even `IndexError: pop from empty list`)
            raise checkpoints.unreadable_file_error(
                checkpoints.unreadable_state_file(checkpoint, ("optimizer.pt", "scheduler.pt")), checkpoint, error
            ) from None

    def _load_rng_state(self, checkpoint):
        try:
            super()._load_rng_state(checkpoint)
        except Exception as error:
            name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
            raise checkpoints.unreadable_file_error(os.path.join(checkpoint, name), checkpoint, error) from None
