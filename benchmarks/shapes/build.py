"""Build the shapes text-to-image model: a small FLUX pipeline pretrained here, the learning yardstick (issue 17).

    python benchmarks/shapes/build.py --output_dir shapes-t2i [--seed 0] [--small]

Renders captioned scenes of colored circles, squares and triangles, trains a small VAE and a flow-matching FLUX
transformer from scratch, saves the pipeline (load it with `DiffusionPipeline.from_pretrained("shapes-t2i")`, sample
it at 32x32) and prints its held-out strict scores per GenEval category. Without `--output_dir` the build goes to the
cache (`$TRL_DANCEGRPO_CACHE` or `~/.cache/trl_dancegrpo`) that tests and benchmarks share, and is reused if there.
"""

import argparse
import os
import shutil
import time

import torch

from trl_dancegrpo.rewards.shapes import shapes_prompts
from trl_dancegrpo.shapes_model import ShapesBuildSettings, evaluate_shapes, shapes_pipeline_path


def held_out_scores(path: str, num_inference_steps: int = 8, per_category: int = 16, seeds=(0, 1)) -> dict:
    """Strict scores of the deterministic sampler on the held-out prompts (unseen combinations included)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path)
    test = shapes_prompts("test", per_category=per_category)

    def generate(prompts, seed):
        generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(prompts))]
        return pipeline(
            prompt=prompts,
            height=32,
            width=32,
            num_inference_steps=num_inference_steps,
            guidance_scale=3.5,
            generator=generators,
            output_type="pt",
            max_sequence_length=12,
        ).images

    return evaluate_shapes(generate, test["prompt"], test["category"], seeds=seeds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="Where to save the pipeline (default: the shared cache).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="The quicker build the slow tests use.")
    parser.add_argument("--no_eval", action="store_true", help="Skip the held-out evaluation.")
    args = parser.parse_args(argv)
    settings = ShapesBuildSettings.small(args.seed) if args.small else ShapesBuildSettings(seed=args.seed)
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    path = shapes_pipeline_path(settings)
    if args.output_dir:
        shutil.copytree(path, args.output_dir, dirs_exist_ok=True)
        path = args.output_dir
    # CPU time of this process (all its threads) next to the wall time: on a shared machine the two part ways
    print(
        f"pipeline at {path} ({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU; "
        f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )
    if not args.no_eval:
        scores = held_out_scores(path)
        print("| category | strict |\n|---|---|")
        for name, value in scores.items():
            print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
