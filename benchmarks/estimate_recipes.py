"""Run `estimate-memory` on every recipe (and the FLUX goals) and print the markdown table of docs/multi_gpu_and_memory.md.

    python benchmarks/estimate_recipes.py > /tmp/table.md

One fake-tensor run per configuration (a few minutes each on one CPU core); the savers' columns are re-derived from
the same run (`MemoryEstimate.with_options`), as `--target_gib` does.
"""

import glob
import os
import sys
import time

from trl_dancegrpo.cli import make_parser
from trl_dancegrpo.memory import estimate_memory


ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml")))
GOALS = [
    (
        "FLUX.1-dev LoRA r=128, 512x512, 1 sample per forward, HPS-v2.1",
        "flux_lora.yaml",
        ["--height", "512", "--width", "512", "--rollout_batch_size", "1", "--reward_funcs", "hpsv2.1"],
    ),
]


def run(recipe: str, extra: list[str]):
    parser = make_parser()
    parser.set_defaults(bf16=True, use_cpu=True, report_to="none")
    parsed = parser.parse_args_and_config(["--config", recipe, "--output_dir", "/tmp/unused", *extra])
    return estimate_memory(*parsed)


def gib(value: int) -> str:
    return f"{value / 2**30:.1f}"


def main() -> None:
    only = sys.argv[1:]
    rows = [(os.path.basename(r), r, []) for r in RECIPES] + [
        (label, os.path.join(ROOT, "examples", "recipes", name), extra) for label, name, extra in GOALS
    ]
    print(
        "| recipe | peak (GiB) | peak phase | + offload_text_encoders | + offload_reward_models | both | "
        "both + FSDP over 8 | training step peak | activations | s/it on H100 at 40% | estimate took |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, recipe, extra in rows:
        if only and not any(word in label for word in only):
            continue
        started = time.perf_counter()
        estimate = run(recipe, extra)
        seconds = time.perf_counter() - started
        text = estimate.with_options(offload_text_encoders=True)
        rewards = estimate.with_options(offload_reward_models=True)
        both = estimate.with_options(offload_text_encoders=True, offload_reward_models=True)
        # two experts (Wan 2.2 A14B) train under DDP only
        fsdp_peak = gib(both.with_options(num_processes=8).peak) if estimate.options["fsdp"] else "n/a (DDP only)"
        s_per_it = estimate.flops_per_iteration / (989.4e12 * 0.4)
        print(
            f"| {label} | {gib(estimate.peak)} | {estimate.peak_phase} | {gib(text.peak)} | {gib(rewards.peak)} | "
            f"{gib(both.peak)} | {fsdp_peak} | {gib(estimate.training_step_peak)} | "
            f"{gib(estimate.breakdown['activations'])} | {s_per_it:.0f} | {seconds:.0f} s ({estimate.cpu_seconds:.0f} s CPU) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
