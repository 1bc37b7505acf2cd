"""What an SDE window buys: the full DanceGRPO trajectory vs a random 2-step window vs a sliding 4-step window.

    python benchmarks/bench_sampler.py                      # small random FLUX-architecture pipeline, CPU
    python benchmarks/bench_sampler.py --preset flux-dev --device cuda --bf16 --lora_rank 128 --size 512

Prints, and writes to --json:
  (a) per training iteration (rollout + rewards + loss + optimizer step) of each variant, side by side in one run
      (interleaved repeats): denoiser rows run without gradient (the rollout) and with gradient (the loss), and the
      median seconds per iteration, with the ratio to the full trajectory;
  (b) unless --skip_learning: learning per unit of compute on the tiny FLUX pipeline of the tests: each variant
      trains on the brightness reward, for several seeds, until it has spent the same budget of denoiser
      forward-equivalents (a row forward = 1, a row forward + backward = 3), and the held-out brightness gain
      (deterministic samples of unseen prompts and seeds) is reported per 1000 forward-equivalents.
Random weights: the figures are about cost, and about which variant moves a reward faster, not about image quality.
"""

import argparse
import json
import statistics
import sys
import tempfile

import torch
import transformers
from datasets import Dataset


sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_trainer import PRESETS, build_pipeline, one_training_step, timed  # noqa: E402


transformers.logging.set_verbosity_error()

VARIANTS = {
    "full": {},  # DanceGRPO: every step but the last stochastic, int(0.6 * (T - 1)) of them trained
    "random-2": dict(sde_window_size=2, timestep_fraction=1.0),  # Flow-GRPO-Fast style
    "sliding-4": dict(sde_window_size=4, sde_window_schedule="sliding", timestep_fraction=1.0),  # MixGRPO style
}
HELD_OUT_PROMPTS = ["a blue house", "two birds", "a green field", "the sea"]


class RowCounter:
    """Counts the rows the denoiser sees, with and without gradient, by wrapping the adapter's `predict`."""

    def __init__(self, adapter):
        self.forward = self.backward = 0
        predict = adapter.predict

        def counted(denoiser, latents, step_index, cond):
            if torch.is_grad_enabled():
                self.backward += latents.shape[0]
            else:
                self.forward += latents.shape[0]
            return predict(denoiser, latents, step_index, cond)

        adapter.predict = counted

    @property
    def forward_equivalents(self) -> int:
        return self.forward + 3 * self.backward


def make_trainer(pipeline, args, num_samples: int, variant: dict, **overrides):
    from peft import LoraConfig

    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
    from trl_dancegrpo.rewards import brightness

    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-sampler-"),
        num_generations=args.G,
        num_inference_steps=args.T,
        per_device_train_batch_size=num_samples,
        height=args.size,
        width=args.size,
        max_steps=10**6,
        learning_rate=1e-5,
        shift=3.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        activation_checkpointing=args.gradient_checkpointing,
    )
    config = DanceGRPOConfig(**{**settings, **variant, **overrides})
    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(4)]})
    peft = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank) if args.lora_rank else None
    trainer = DanceGRPOTrainer(pipeline, brightness, args=config, train_dataset=prompts, peft_config=peft)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    return trainer


def measure_cost(args, results) -> None:
    preset, device = PRESETS[args.preset], torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    inputs = [{"prompt": "prompt number 0"}] * args.G
    trainers, counters = {}, {}
    for name, variant in VARIANTS.items():
        trainers[name] = make_trainer(
            build_pipeline(preset, dtype if args.lora_rank else torch.float32), args, args.G, variant
        )
        counters[name] = RowCounter(trainers[name].adapter)
    fns = [lambda trainer=trainer: one_training_step(trainer, inputs) for trainer in trainers.values()]
    seconds = timed(fns, args.repeats, device)
    calls = args.repeats + 1
    print(f"(a) {args.preset}, {args.G} samples x {args.T} steps, {args.size}px, {device}, per training iteration:")
    full = seconds[0]
    for (name, counter), s in zip(counters.items(), seconds):
        row = {
            "rows_forward_no_grad": counter.forward / calls,
            "rows_forward_backward": counter.backward / calls,
            "seconds_per_iteration": s,
            "ratio_to_full": s / full,
        }
        results["cost"][name] = row
        print(
            f"    {name:10s} rows no-grad {row['rows_forward_no_grad']:6.1f}  rows fwd+bwd {row['rows_forward_backward']:5.1f}"
            f"  {s:.3f} s/it  ({s / full:.2f}x the full trajectory)"
        )


def held_out_brightness(trainer) -> float:
    values = [trainer.generate(HELD_OUT_PROMPTS, seed=s)[0].mean() for s in (101, 202, 303)]
    return torch.stack(values).mean().item()


def measure_learning(args, results) -> None:
    from trl_dancegrpo.tiny import tiny_flux_pipeline

    # the learning set-up of tests/test_learning.py with more steps, so that windows have room: tiny FLUX, 4 prompts
    # x G = 4, lr 1e-2, full fine-tuning
    settings = argparse.Namespace(**{**vars(args), "G": 4, "T": args.learning_T, "size": 32, "lora_rank": 0})
    budget = None
    print(f"(b) learning per compute, tiny FLUX, T = {settings.T}, seeds {args.seeds}:")
    for name, variant in VARIANTS.items():
        gains, spent = [], []
        for seed in args.seeds:
            trainer = make_trainer(tiny_flux_pipeline(), settings, 16, variant, learning_rate=1e-2, seed=seed)
            counter = RowCounter(trainer.adapter)
            before = held_out_brightness(trainer)
            counter.forward = 0  # the held-out sampling does not count
            inputs = [{"prompt": f"prompt number {i // 4}"} for i in range(16)]
            step = 0
            while (step < args.full_steps) if budget is None else (counter.forward_equivalents < budget):
                one_training_step(trainer, inputs)
                step += 1
            if budget is None:
                budget = counter.forward_equivalents  # the full trajectory's spend sets the budget for all
            gains.append(held_out_brightness(trainer) - before)
            spent.append(counter.forward_equivalents)
        row = {
            "gains": gains,
            "mean_gain": statistics.mean(gains),
            "forward_equivalents": statistics.mean(spent),
            "gain_per_1000_forward_equivalents": 1000 * statistics.mean(gains) / statistics.mean(spent),
        }
        results["learning"][name] = row
        print(
            f"    {name:10s} held-out gain {row['mean_gain']:+.4f} (seeds: {', '.join(f'{g:+.4f}' for g in gains)}) "
            f"for {row['forward_equivalents']:.0f} forward-equivalents: {row['gain_per_1000_forward_equivalents']:+.4f} "
            "per 1000"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora_rank", type=int, default=16, help="0 = full fine-tuning")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--G", type=int, default=12, help="group size = samples per iteration (one prompt)")
    parser.add_argument("--T", type=int, default=16, help="sampler steps")
    parser.add_argument("--size", type=int, default=None, help="image size; default: the preset's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_cost", action="store_true")
    parser.add_argument("--skip_learning", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--learning_T", type=int, default=8)
    parser.add_argument("--full_steps", type=int, default=20, help="optimizer steps of the full trajectory (budget)")
    parser.add_argument("--json", default="benchmarks/bench_sampler.json")
    args = parser.parse_args()
    args.size = args.size or PRESETS[args.preset]["size"]
    results = {"preset": args.preset, "device": args.device, "G": args.G, "T": args.T, "size": args.size}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    results["cost"], results["learning"] = {}, {}
    if not args.skip_cost:
        measure_cost(args, results)
    if not args.skip_learning:
        measure_learning(args, results)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
