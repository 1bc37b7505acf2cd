"""The video rows of docs/multi_gpu_and_memory.md at the official video scale: `estimate-memory` once per model, then
the peak per process re-derived for context parallelism over N = 1, 2, 4, 8 processes (`MemoryEstimate.with_options`,
as `--context_parallel N` does), with FSDP over 8 processes and both savers (text encoders and reward models
offloaded).

    python benchmarks/estimate_context_parallel.py [WORD ...] > /tmp/rows.md   (only the rows whose label has a WORD)

A few minutes of CPU per model (fake tensors at the real size).
"""

import os
import sys
import time

from trl_dancegrpo.cli import make_parser
from trl_dancegrpo.memory import estimate_memory
from trl_dancegrpo.memory.report import needed_gib


ROOT = os.path.join(os.path.dirname(__file__), "..")
HUNYUAN = os.path.join(ROOT, "examples", "recipes", "hunyuan_video.yaml")
# the HunyuanVideo recipe (LoRA r=64, best-of-8 of G = 24, one sample per forward, VideoAlign) at each model's size
ROWS = [
    ("HunyuanVideo 720x1280x129", HUNYUAN, ["--height", "720", "--width", "1280", "--num_frames", "129"]),
    (
        "Wan 2.1 T2V 14B 720x1280x81",
        HUNYUAN,
        ["--model_name_or_path", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "--shift", "5.0", "--eta", "0.3"]
        + ["--height", "720", "--width", "1280", "--num_frames", "81"],
    ),
]
SIZES = (1, 2, 4, 8)
CARD_GIB = 80


def main() -> None:
    print(
        "| model, size (tokens per sample) | peak, 1 GPU | FSDP over 8 + both savers: N = 1 | N = 2 | N = 4 | N = 8 | "
        f"smallest N for {CARD_GIB} GB (its peak phase) | estimate took |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    only = sys.argv[1:]
    for label, recipe, extra in ROWS:
        if only and not any(word in label for word in only):
            continue
        parser = make_parser()
        parser.set_defaults(bf16=True, use_cpu=True, report_to="none")
        parsed = parser.parse_args_and_config(["--config", recipe, "--output_dir", "/tmp/unused", *extra])
        started = time.perf_counter()
        estimate = estimate_memory(*parsed)
        seconds = time.perf_counter() - started
        savers = dict(offload_text_encoders=True, offload_reward_models=True, num_processes=8)
        derived = {n: estimate.with_options(context_parallel=n, **savers) for n in SIZES}
        peaks = {n: derived[n].peak for n in SIZES}
        fitting = [n for n in SIZES if needed_gib(peaks[n]) <= CARD_GIB]
        cells = " | ".join(f"{peaks[n] / 2**30:.1f}" for n in SIZES)
        smallest = f"{fitting[0]} ({derived[fitting[0]].peak_phase})" if fitting else f"none up to {SIZES[-1]}"
        print(
            f"| {label} ({estimate.settings['sequence_tokens']:,}) | {estimate.peak / 2**30:.1f} | {cells} | "
            f"{smallest} | {seconds:.0f} s ({estimate.cpu_seconds:.0f} s CPU) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
