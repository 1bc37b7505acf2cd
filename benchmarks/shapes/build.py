"""Build the shapes text-to-image model: a small FLUX pipeline pretrained here, the learning yardstick (issue 17).

    python benchmarks/shapes/build.py --output_dir shapes-t2i [--seed 0] [--small]

Renders captioned scenes of colored circles, squares and triangles, trains a small VAE and a flow-matching FLUX
transformer from scratch, saves the pipeline (load it with `DiffusionPipeline.from_pretrained("shapes-t2i")`, sample
it at 32x32) and prints its held-out strict scores per GenEval category (`--guidance_scales 1 2`: a column per true
CFG scale). Without `--output_dir` the build goes to the cache (`$TRL_DANCEGRPO_CACHE` or `~/.cache/trl_dancegrpo`)
that tests and benchmarks share, and is reused if there.
"""

import argparse
import os
import shutil
import time

import torch

from trl_dancegrpo.rewards.shapes import shapes_prompts
from trl_dancegrpo.shapes_model import (
    EVAL_GUIDANCE_SCALE,
    EVAL_NUM_INFERENCE_STEPS,
    MAX_SEQUENCE_LENGTH,
    ShapesBuildSettings,
    evaluate_shapes,
    shapes_pipeline_path,
)


def held_out_scores(
    path: str,
    num_inference_steps: int = EVAL_NUM_INFERENCE_STEPS,
    guidance_scale: float = EVAL_GUIDANCE_SCALE,
    per_category: int = 16,
    seeds=(0, 1),
) -> dict:
    """Strict scores of the deterministic sampler on the held-out prompts (unseen combinations included), guided by
    true CFG at `guidance_scale` (the empty negative prompt; 1: unguided)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path)
    test = shapes_prompts("test", per_category=per_category)

    def generate(prompts, seed):
        generators = [torch.Generator().manual_seed(1000 * seed + i) for i in range(len(prompts))]
        guidance = {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * len(prompts)}
        return pipeline(
            prompt=prompts,
            height=32,
            width=32,
            num_inference_steps=num_inference_steps,
            **(guidance if guidance_scale > 1 else {}),
            generator=generators,
            output_type="pt",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images

    return evaluate_shapes(generate, test["prompt"], test["category"], seeds=seeds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", help="Where to save the pipeline (default: the shared cache).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="The quicker build the slow tests use.")
    parser.add_argument("--no_eval", action="store_true", help="Skip the held-out evaluation.")
    parser.add_argument(
        "--guidance_scales",
        nargs="+",
        type=float,
        default=[EVAL_GUIDANCE_SCALE],
        help=f"True CFG scales to evaluate at, one column each (default: the yardstick's, {EVAL_GUIDANCE_SCALE}).",
    )
    parser.add_argument("--num_inference_steps", type=int, default=EVAL_NUM_INFERENCE_STEPS)
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
        columns = {g: held_out_scores(path, args.num_inference_steps, g) for g in args.guidance_scales}
        print(f"held-out scores, {args.num_inference_steps} deterministic steps, true CFG scale per column")
        print("| category | " + " | ".join(f"CFG {g:g}" for g in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name in next(iter(columns.values())):
            print(f"| {name} | " + " | ".join(f"{scores[name]:.3f}" for scores in columns.values()) + " |")


if __name__ == "__main__":
    main()
