"""Peak memory and seconds per training iteration of DanceGRPO on video models, with and without gradient checkpointing.

    python benchmarks/bench_video.py                                    # small random HunyuanVideo-architecture, CPU
    python benchmarks/bench_video.py --preset small-wan                 # small random Wan-architecture, CPU
    python benchmarks/bench_video.py --preset hunyuan-video --device cuda --bf16   # HunyuanVideo-sized (13B)
    python benchmarks/bench_video.py --preset wan-1.3b --device cuda --bf16        # Wan 2.1 1.3B-sized

One iteration is what the Trainer does per optimizer step: rollout (G samples, T SDE steps, decoding), rewards
(brightness: free), the loss on ceil(0.6 T) steps per sample with one backward per step and slice, the optimizer step.
The transformer (and, for the GPU presets, the VAE) has the real architecture and size with random weights; the text
encoders are the tiny ones, their embeddings repeated to the transformer's text width (they run once per prompt and
are not what is measured). Each configuration runs in its own process so that peak memory is its own: CUDA max
allocated (and reserved); on CPU the peak resident set size of the process (whole process, weights included).
Random weights: the figures are about speed and memory, not quality.
"""

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch


PRESETS = {
    # big enough that the transformer dominates on a CPU, small enough to run in a minute
    "small-hunyuan": dict(
        family="hunyuan",
        transformer=dict(
            num_attention_heads=4,
            attention_head_dim=32,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            rope_axes_dim=(8, 12, 12),
            text_embed_dim=16,
            pooled_projection_dim=8,
        ),
        real_vae=False,
        size=64,
        frames=9,
        G=4,
        prompts=1,
        T=8,
        rollout_batch_size=None,
    ),
    "small-wan": dict(
        family="wan",
        transformer=dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=4, text_dim=32),
        real_vae=False,
        size=64,
        frames=9,
        G=4,
        prompts=1,
        T=8,
        rollout_batch_size=None,
    ),
    # HunyuanVideo's transformer (about 13B parameters) and VAE, DanceGRPO's recipe shift and a short clip
    "hunyuan-video": dict(
        family="hunyuan",
        transformer=dict(
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            patch_size=2,
            rope_axes_dim=(16, 56, 56),
            text_embed_dim=4096,
            pooled_projection_dim=768,
        ),
        real_vae=True,
        size=480,
        frames=17,
        G=4,
        prompts=1,
        T=16,
        rollout_batch_size=1,
    ),
    # Wan 2.1 T2V 1.3B's transformer and VAE
    "wan-1.3b": dict(
        family="wan",
        transformer=dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
        real_vae=True,
        size=480,
        frames=17,
        G=4,
        prompts=1,
        T=16,
        rollout_batch_size=1,
    ),
}


def _widen(embeds: torch.Tensor, width: int) -> torch.Tensor:
    if embeds.shape[-1] == width:
        return embeds
    return embeds.repeat(*([1] * (embeds.ndim - 1)), math.ceil(width / embeds.shape[-1]))[..., :width]


def build_pipeline(preset: dict, dtype: torch.dtype):
    from trl_dancegrpo import tiny

    torch.manual_seed(0)
    if preset["family"] == "hunyuan":
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

        pipeline = tiny.tiny_hunyuan_video_pipeline()
        config = dict(in_channels=16, out_channels=16, guidance_embeds=True, **preset["transformer"])
        if preset["real_vae"]:
            pipeline.vae = AutoencoderKLHunyuanVideo()  # 16 latent channels, as the transformer
        else:
            config.update(in_channels=4, out_channels=4)
        pipeline.transformer = HunyuanVideoTransformer3DModel(**config).to(dtype)
        text_width, pooled_width = config["text_embed_dim"], config["pooled_projection_dim"]
        encode = pipeline.encode_prompt

        def widened(*args, **kwargs):
            prompt_embeds, pooled, mask = encode(*args, **kwargs)
            return _widen(prompt_embeds, text_width), _widen(pooled, pooled_width), mask

    else:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        pipeline = tiny.tiny_wan_pipeline()
        if preset["real_vae"]:
            pipeline.vae = AutoencoderKLWan()
        config = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), freq_dim=256, **preset["transformer"])
        config.update(cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        pipeline.transformer = WanTransformer3DModel(**config).to(dtype)
        text_width = config["text_dim"]
        encode = pipeline.encode_prompt

        def widened(*args, **kwargs):
            prompt_embeds, negative = encode(*args, **kwargs)
            return _widen(prompt_embeds, text_width), negative

    pipeline.encode_prompt = widened
    pipeline.register_modules(vae=pipeline.vae, transformer=pipeline.transformer)
    return pipeline


def peak_memory_mb(device) -> dict:
    if device.type == "cuda":
        return {
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        }
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(options: dict) -> dict:
    """One configuration in this process: build, one warm-up iteration, then `repeats` timed ones."""
    import transformers
    from datasets import Dataset
    from peft import LoraConfig

    from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
    from trl_dancegrpo.rewards import brightness

    transformers.logging.set_verbosity_error()
    preset, device = PRESETS[options["preset"]], torch.device(options["device"])
    dtype = torch.bfloat16 if options["bf16"] else torch.float32
    size, frames = options["size"] or preset["size"], options["num_frames"] or preset["frames"]
    steps = options["num_inference_steps"] or preset["T"]
    samples = preset["G"] * preset["prompts"]
    pipeline = build_pipeline(preset, dtype if options["lora_rank"] else torch.float32)
    config = DanceGRPOConfig(
        output_dir="/tmp/bench-video-dancegrpo",
        num_generations=preset["G"],
        num_inference_steps=steps,
        per_device_train_batch_size=samples,
        rollout_batch_size=options["rollout_batch_size"] or preset["rollout_batch_size"],
        height=size,
        width=size,
        num_frames=frames,
        shift=5.0 if preset["family"] == "hunyuan" else 3.0,  # DanceGRPO's HunyuanVideo recipe; Wan 480p's flow shift
        eta=0.25,
        max_steps=10**6,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_samples=False,
        bf16=options["bf16"],
        use_cpu=device.type == "cpu",
        gradient_checkpointing=options["gradient_checkpointing"],
        vae_tiling=options["vae_tiling"],
    )
    prompts = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(preset["prompts"] * 4)]})
    rank = options["lora_rank"]
    peft = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian") if rank else None
    trainer = DanceGRPOTrainer(pipeline, brightness, args=config, train_dataset=prompts, peft_config=peft)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    inputs = [{"prompt": f"prompt number {i // preset['G']}"} for i in range(samples)]
    metrics = trainer._metrics["train"]

    def iteration():
        trainer._micro_step, trainer._buffered_inputs = 0, None
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, rollout, train = [], [], []
    for repeat in range(options["repeats"] + 1):  # the first one warms up
        metrics.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        iteration()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat:
            times.append(time.perf_counter() - start)
            rollout.append(metrics["timing/rollout"][-1])
            train.append(metrics["timing/train"][-1])
    latent_shape = tuple(trainer.adapter.latent_shape)
    return {
        "preset": options["preset"],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "transformer_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "clip": f"{size}x{size}x{frames}",
        "latent_shape": latent_shape,
        "samples": samples,
        "steps": steps,
        "trained_steps": trainer.sampler.num_train_steps,
        "rollout_batch_size": config.rollout_batch_size,
        "dtype": "bf16" if options["bf16"] else "fp32",
        "lora_rank": rank,
        "gradient_checkpointing": options["gradient_checkpointing"],
        "vae_tiling": options["vae_tiling"],
        "s_per_iteration": statistics.median(times),
        "rollout_s": statistics.median(rollout),
        "train_s": statistics.median(train),
        **peak_memory_mb(device),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small-hunyuan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora_rank", type=int, default=64, help="0 = full fine-tuning")
    parser.add_argument("--gradient_checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--vae_tiling", action="store_true")
    parser.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the preset's)")
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--rollout_batch_size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/bench_video.json")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker is not None:  # one configuration, in its own process
        print("RESULT " + json.dumps(run_one(json.loads(args._worker))))
        return

    options = {key: value for key, value in vars(args).items() if key not in ("json", "_worker")}
    settings = {"both": [False, True], "on": [True], "off": [False]}[args.gradient_checkpointing]
    results = []
    for checkpointing in settings:
        worker = json.dumps({**options, "gradient_checkpointing": checkpointing})
        process = subprocess.run([sys.executable, __file__, "--_worker", worker], capture_output=True, text=True)
        lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode or not lines:
            error = (process.stderr.strip().splitlines() or ["no output"])[-1]
            oom = "OutOfMemoryError" in process.stderr
            result = {"gradient_checkpointing": checkpointing, "error": "out of memory" if oom else error}
            print(f"gradient checkpointing {'on ' if checkpointing else 'off'}: FAILED ({result['error']})")
        else:
            result = json.loads(lines[-1][len("RESULT ") :])
            memory = ", ".join(f"{key} {value:.0f}" for key, value in result.items() if key.endswith("_mb"))
            print(
                f"{result['preset']} ({result['transformer_parameters'] / 1e6:.1f}M-parameter transformer, "
                f"{result['trainable_parameters'] / 1e6:.2f}M trained), {result['clip']} ({result['samples']} "
                f"samples x {result['steps']} steps, {result['trained_steps']} trained, rollout batch "
                f"{result['rollout_batch_size']}), {result['dtype']}, {result['device']}: gradient checkpointing "
                f"{'on ' if checkpointing else 'off'}: {result['s_per_iteration']:.2f} s/iteration (rollout "
                f"{result['rollout_s']:.2f} s, loss {result['train_s']:.2f} s), {memory} MiB"
            )
        results.append(result)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
