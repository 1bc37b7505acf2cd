"""Speed and memory of the DanceGRPO rollout and training step, measured side by side in one run.

    python benchmarks/bench_trainer.py                          # small random FLUX-architecture pipeline, CPU
    python benchmarks/bench_trainer.py --preset flux-dev --device cuda --bf16   # FLUX.1-dev-sized transformer

Prints, and writes to --json:
  (a) our rollout (encode + SDE sampling + decode of N samples) vs. the plain `pipeline(...)` call producing the same
      number of samples with the same steps and size;
  (b) one whole training step (rollout + rewards + loss + optimizer) batched vs. sample by sample (rollout_batch_size=1,
      what the research code does);
  (c) our training phase vs. the bare forward + backward cost of the trained timesteps on the same batch shapes;
  (d) peak memory (CUDA: max allocated; CPU: peak resident set size of the process).
Random weights: the figures are about speed and memory, not quality.
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import transformers
from datasets import Dataset


transformers.logging.set_verbosity_error()

PRESETS = {
    # big enough that the denoiser dominates on a CPU, small enough to run in a minute
    "small": dict(
        transformer=dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            axes_dims_rope=[8, 12, 12],
        ),
        size=64,
        G=4,
        prompts=2,
        T=8,
    ),
    # FLUX.1-dev's transformer (12B parameters)
    "flux-dev": dict(
        transformer=dict(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            axes_dims_rope=[16, 56, 56],
        ),
        size=512,
        G=4,
        prompts=1,
        T=16,
    ),
}


def build_pipeline(preset: dict, dtype):
    from diffusers import FluxTransformer2DModel

    from trl_dancegrpo.tiny import tiny_flux_pipeline

    pipeline = tiny_flux_pipeline()
    torch.manual_seed(0)
    config = dict(patch_size=1, in_channels=16, guidance_embeds=True, **preset["transformer"])
    pipeline.transformer = FluxTransformer2DModel(**config).to(dtype)
    # the text encoders of the tiny pipeline emit 32-dim embeddings; project to the transformer's widths
    joint, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    if joint != 32 or pooled != 32:
        encode = pipeline.encode_prompt

        def widened(*args, **kwargs):
            prompt_embeds, pooled_embeds, text_ids = encode(*args, **kwargs)
            prompt_embeds = prompt_embeds.repeat(1, 1, math.ceil(joint / 32))[..., :joint]
            pooled_embeds = pooled_embeds.repeat(1, math.ceil(pooled / 32))[..., :pooled]
            return prompt_embeds, pooled_embeds, text_ids

        pipeline.encode_prompt = widened
    return pipeline


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fns, repeats: int, device) -> list[float]:
    """Median seconds of each function, run interleaved (a, b, a, b, ...) so that machine noise hits both alike."""
    times = [[] for _ in fns]
    for _ in range(repeats + 1):  # the first round warms up
        for fn, bucket in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket[1:] or bucket) for bucket in times]


def make_trainer(pipeline, preset, args, rollout_batch_size=None):
    from peft import LoraConfig

    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
    from trl_dancegrpo.rewards import brightness

    samples = preset["G"] * preset["prompts"]
    config = DanceGRPOConfig(
        output_dir="/tmp/bench-dancegrpo",
        num_generations=preset["G"],
        num_inference_steps=preset["T"],
        per_device_train_batch_size=samples,
        rollout_batch_size=rollout_batch_size,
        height=preset["size"],
        width=preset["size"],
        max_steps=10**6,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        bf16=args.bf16,
        use_cpu=args.device == "cpu",
        activation_checkpointing=args.gradient_checkpointing,
    )
    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(preset["prompts"] * 4)]})
    peft = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank) if args.lora_rank else None
    trainer = DanceGRPOTrainer(pipeline, brightness, args=config, train_dataset=prompts, peft_config=peft)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    return trainer


def one_training_step(trainer, inputs):
    """What the Trainer does per optimizer step (one rollout feeds one step): rollout, loss + backward, update."""
    trainer._buffered_inputs = None
    trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora_rank", type=int, default=0, help="0 = full fine-tuning")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/bench_trainer.json")
    args = parser.parse_args()
    preset, device = PRESETS[args.preset], torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    pipeline = build_pipeline(preset, dtype if args.lora_rank else torch.float32)
    samples = preset["G"] * preset["prompts"]
    prompts = [f"prompt number {i // preset['G']}" for i in range(samples)]
    inputs = [{"prompt": p} for p in prompts]
    results = {
        "preset": args.preset,
        "device": str(device),
        "samples": samples,
        "steps": preset["T"],
        "size": preset["size"],
        "lora_rank": args.lora_rank,
        "bf16": args.bf16,
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    trainer = make_trainer(pipeline, preset, args)
    params = sum(p.numel() for p in trainer.model.parameters())
    results["denoiser_parameters"] = params
    print(
        f"{args.preset}: {params / 1e6:.1f}M-parameter transformer, {samples} samples x {preset['T']} steps, "
        f"{preset['size']}px, {device}, {'bf16' if args.bf16 else 'fp32'}, "
        f"{f'LoRA r={args.lora_rank}' if args.lora_rank else 'full fine-tuning'}"
    )

    # (a) rollout vs. plain inference
    def plain():
        with torch.no_grad(), trainer.accelerator.autocast():
            pipeline(
                prompt=list(dict.fromkeys(prompts)),
                num_images_per_prompt=preset["G"],
                height=preset["size"],
                width=preset["size"],
                num_inference_steps=preset["T"],
                guidance_scale=3.5,
                output_type="pt",
                max_sequence_length=min(512, pipeline.tokenizer_2.model_max_length),
            )  # as the adapter does

    pipeline.set_progress_bar_config(disable=True)
    ours, reference = timed(
        [lambda: trainer.generate(prompts, seed=0, eta=0.3, group_size=preset["G"]), plain],
        args.repeats,
        device,
    )
    results["a_rollout_s"], results["a_plain_pipeline_s"] = ours, reference
    print(f"(a) rollout {ours:.3f}s vs plain pipeline {reference:.3f}s: ratio {ours / reference:.3f}")

    # (b) batched vs. sample-by-sample training step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    (batched,) = timed([lambda: one_training_step(trainer, inputs)], 0, device)
    results["d_peak_memory_mb"] = peak_memory_mb(device)
    # the same weights (same seed) in a second pipeline: a LoRA cannot be added twice to one denoiser
    single = make_trainer(build_pipeline(preset, dtype if args.lora_rank else torch.float32), preset, args, 1)
    batched, one_by_one = timed(
        [lambda: one_training_step(trainer, inputs), lambda: one_training_step(single, inputs)], args.repeats, device
    )
    results["b_batched_step_s"], results["b_sample_by_sample_step_s"] = batched, one_by_one
    print(
        f"(b) training step batched {batched:.3f}s vs sample by sample {one_by_one:.3f}s: "
        f"speed-up {one_by_one / batched:.2f}x"
    )

    # (c) training phase vs. bare forward + backward of the trained timesteps
    batch = trainer._generate_and_score(inputs)
    trainer._buffered_inputs = [batch]
    chunk = batch
    num_steps = chunk["train_steps"].shape[1]
    rows = torch.arange(samples, device=device)

    def bare():
        for j in range(num_steps):
            index = chunk["train_steps"][:, j]
            with trainer.accelerator.autocast():
                out = trainer.adapter.predict(trainer.model, chunk["latents"][rows, index], index, chunk["cond"])
            out.float().square().mean().backward()

    phase, bare_s = timed([lambda: trainer._policy_step(trainer.model, chunk), bare], args.repeats, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    results["c_training_phase_s"], results["c_bare_forward_backward_s"] = phase, bare_s
    print(f"(c) training phase {phase:.3f}s vs bare forward+backward {bare_s:.3f}s: ratio {phase / bare_s:.3f}")
    label = "max CUDA allocated" if device.type == "cuda" else "peak RSS of the process"
    print(f"(d) peak memory ({label}) during the batched training step: {results['d_peak_memory_mb']:.0f} MiB")
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
