"""Measured peak GPU memory and s/it of a recipe at its real size with random weights, next to `estimate-memory`.

    python benchmarks/gpu_memory_check.py --config examples/recipes/flux_lora.yaml --height 512 --width 512 \\
        --rollout_batch_size 1 --reward_funcs brightness --max_steps 2

The pipeline is built from the same configuration the estimate uses (a local folder, the Hub cache, or the built-in
table), with random weights (normal, std 0.02) directly on the GPU: no download. The trainer then runs `max_steps`
optimizer steps. Printed (and appended as one JSON line to --results): the estimate's peak, the measured
`torch.cuda.max_memory_allocated` (what the estimate counts) and `max_memory_reserved` (with the allocator's
reserve), and the seconds per iteration after the first. Use a reward without weights (`brightness`) or add the reward
model's size by hand: the rewards' checkpoints are not available here.
"""

import argparse
import json
import sys
import time

import torch
from datasets import Dataset


def random_weights_pipeline(model_name_or_path: str, device: str, dtype: torch.dtype):
    from trl_dancegrpo.memory.configs import build_meta_pipeline, load_pipeline_config

    pipeline = build_meta_pipeline(load_pipeline_config(model_name_or_path))
    generator = torch.Generator(device=device).manual_seed(0)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.to_empty(device=device)
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    if tensor.is_floating_point():
                        tensor.normal_(0, 0.02, generator=generator)
                    else:
                        tensor.zero_()
            module.to(dtype)
    return pipeline


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--results", default="benchmarks/gpu_check.jsonl")
    own.add_argument("--device", default="cuda")
    options, rest = own.parse_known_args()

    from peft import LoraConfig

    from trl_dancegrpo import DanceGRPOTrainer
    from trl_dancegrpo.cli import make_parser
    from trl_dancegrpo.memory import estimate_memory

    parser = make_parser()
    parser.set_defaults(report_to="none", save_strategy="no", output_dir="/tmp/gpu_check", log_samples=False)
    if options.device == "cpu":  # a smoke test of this script on a machine without a GPU
        parser.set_defaults(use_cpu=True)
    script_args, args, model_args = parser.parse_args_and_config(rest)
    estimate = estimate_memory(script_args, args, model_args)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    pipeline = random_weights_pipeline(model_args.model_name_or_path, options.device, dtype)
    peft_config = None
    if model_args.use_peft:
        peft_config = LoraConfig(
            r=model_args.lora_r, lora_alpha=model_args.lora_alpha, target_modules=model_args.lora_target_modules
        )
    rows = max(1, args.generation_batch_size // args.num_generations) * 4
    dataset = {"prompt": [f"a photo of object number {i}" for i in range(rows)]}
    if pipeline.__class__.__name__ in ("HunyuanSkyreelsImageToVideoPipeline", "WanImageToVideoPipeline"):
        from PIL import Image

        dataset["image"] = [
            Image.new("RGB", (args.width or 480, args.height or 480), (i, 90, 160)) for i in range(rows)
        ]
    trainer = DanceGRPOTrainer(
        model=pipeline,
        reward_funcs=script_args.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict(dataset),
        peft_config=peft_config,
    )
    step_times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            if options.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    if options.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = {
        "argv": rest,
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "estimate_peak_gib": round(estimate.peak / 2**30, 2),
        "estimate_peak_phase": estimate.peak_phase,
        "estimate_training_step_peak_gib": round(estimate.training_step_peak / 2**30, 2),
        "step_seconds": [round(t, 2) for t in step_times],
        "seconds_per_iteration": round(sum(step_times[1:]) / max(1, len(step_times) - 1), 2),
        "estimate_flops_per_iteration": estimate.flops_per_iteration,
    }
    if options.device == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(result), flush=True)
    with open(options.results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
