"""Learning per compute on the shapes yardstick: held-out GenEval-style strict score vs denoiser compute, per sampler.

    python benchmarks/bench_learning.py [--variants dancegrpo flow_grpo cps window2 mixgrpo grpo_guard nft awm ...]
                                        [--seeds 0 1 2]
                                        [--max_steps 60] [--eval_every 20] [--learning_rate 1e-4] [--small]
                                        [--output_dir bench-learning]

Trains the shapes model (`benchmarks/shapes/build.py`, built once into the cache) with the dense reward
`shapes_geneval_dense` on the training prompts, and every `--eval_every` optimizer steps samples the held-out prompts
(unseen combinations included) with the deterministic sampler at fixed seeds and scores them with the strict reward
`shapes_geneval`. Variants: DanceGRPO's full trajectory (`dancegrpo`: the default recipe, tau 0.6),
`sde_type="flow_grpo"`, `sde_type="cps"`, the random 2-step window (`window2`, Flow-GRPO-Fast), MixGRPO's sliding
2-step window (`mixgrpo`), and GRPO-Guard's objective (`algorithm="grpo_guard"`) on Flow-GRPO's step, as the paper
(`grpo_guard`), and on DanceGRPO's (`grpo_guard_dancegrpo`): the same forwards, so the same compute per step; and
the other objectives on the deterministic sampler, DiffusionNFT (`nft`) and Advantage Weighted Matching (`awm`), at
the same settings (learning rate, trained steps per sample).

Compute is counted from what the run does: a forward hook on the denoiser adds the batch size of every call made
during training (rollouts and loss, not the held-out evaluation), 1 per sample for a forward without gradient and 3
for one with gradient (its backward costs about two forwards). Run it on one thread (`OMP_NUM_THREADS=1`): these
layers are too small to split, and on a shared machine two threads cost several times the CPU time. Prints the table
(score at equal compute, compute to reach a score), writes `results.json` and a PNG plot (score vs compute, one line
per variant, a band over seeds).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.rewards.shapes import shapes_geneval_dense, shapes_prompts
from trl_dancegrpo.shapes_model import (
    EVAL_GUIDANCE_SCALE,
    ShapesBuildSettings,
    evaluate_shapes,
    shapes_pipeline_path,
)


transformers.logging.set_verbosity_error()


VARIANTS = {
    "dancegrpo": {},
    "flow_grpo": {"sde_type": "flow_grpo"},
    "cps": {"sde_type": "cps"},
    "window2": {"sde_window_size": 2, "timestep_fraction": 1.0},
    "mixgrpo": {"sde_window_size": 2, "timestep_fraction": 1.0, "sde_window_schedule": "sliding"},
    # the clip range of verl-omni's GRPO-Guard docs (on-policy, as here, the clip never acts: the ratio is 1)
    "grpo_guard": {"algorithm": "grpo_guard", "sde_type": "flow_grpo", "epsilon": 2e-6},
    "grpo_guard_dancegrpo": {"algorithm": "grpo_guard", "epsilon": 2e-6},
    "nft": {"algorithm": "nft"},  # DiffusionNFT: deterministic rollout, forward-process loss (nft_beta 1)
    "awm": {"algorithm": "awm"},  # Advantage Weighted Matching: deterministic rollout, weighted matching loss
}


class ComputeCounter:
    """Denoiser forward-equivalents: +1 per sample for a forward, +3 when it builds a graph (forward + backward)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0
        self.paused = False
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_output, output=None):
        if self.paused:
            return
        output = kwargs_or_output if output is None else output
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.total += tensor.shape[0] * (3 if tensor.requires_grad else 1)


def run(path: str, variant: str, seed: int, args) -> list[dict]:
    train = shapes_prompts("train", per_category=64, seed=seed)
    test = shapes_prompts("test", per_category=args.eval_per_category)
    config = DanceGRPOConfig(
        output_dir=str(Path(args.output_dir) / f"{variant}-{seed}"),
        seed=seed,
        num_generations=args.group_size,
        per_device_train_batch_size=args.group_size * args.prompts_per_step,
        per_device_eval_batch_size=64,
        num_inference_steps=args.steps,
        guidance_scale=EVAL_GUIDANCE_SCALE,  # the yardstick's true CFG scale (the FLUX default 3.5 would mean CFG)
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        height=32,
        width=32,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_samples=False,
        logging_steps=10**6,
        **VARIANTS[variant],
    )
    trainer = DanceGRPOTrainer(model=path, reward_funcs=shapes_geneval_dense, args=config, train_dataset=train)
    counter = ComputeCounter(trainer.denoiser)
    history = []
    start = time.perf_counter()
    paused_time = 0.0

    def evaluate(step: int) -> None:
        nonlocal paused_time
        counter.paused, t0 = True, time.perf_counter()
        scores = evaluate_shapes(
            lambda prompts, s: trainer.generate(prompts, seed=10_000 + s)[0],
            test["prompt"],
            test["category"],
            seeds=range(args.eval_seeds),
        )
        paused_time += time.perf_counter() - t0
        counter.paused = False
        wall = time.perf_counter() - start - paused_time
        history.append({"step": step, "compute": counter.total, "wall_s": wall, **scores})
        print(
            f"  {variant} seed {seed} step {step}: strict {scores['strict']:.3f} dense {scores['dense']:.3f} "
            f"compute {counter.total} wall {wall:.0f} s",
            flush=True,
        )

    class EvalCallback(transformers.TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % args.eval_every == 0:
                evaluate(state.global_step)

    trainer.add_callback(EvalCallback())
    evaluate(0)
    trainer.train()
    if history[-1]["step"] != args.max_steps:
        evaluate(args.max_steps)
    return history


def interpolate(history: list[dict], compute: float) -> float:
    points = [(h["compute"], h["strict"]) for h in history]
    for (c0, s0), (c1, s1) in zip(points, points[1:]):
        if c0 <= compute <= c1:
            return s0 + (s1 - s0) * (compute - c0) / max(c1 - c0, 1)
    return float("nan")


def first_reaching(history: list[dict], score: float) -> float:
    for h in history:
        if h["strict"] >= score:
            return h["compute"]
    return float("nan")


def report(results: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start_scores = [h[0]["strict"] for runs in results.values() for h in runs]
    base = statistics.mean(start_scores)
    target = base + 0.1
    equal = min(max(h[-1]["compute"] for h in runs) for runs in results.values())
    lines = [
        f"held-out strict score of the pretrained model: {base:.3f}; equal compute C = {equal:.3g} forward-equivalents",
        "| variant | seeds | strict at start | strict at C (mean ± sd) | final strict (mean ± sd) | "
        f"compute to reach {target:.3f} | wall s per 1e4 fwd-eq |",
        "|---|---|---|---|---|---|---|",
    ]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for variant, runs in results.items():
        at_equal = [interpolate(h, equal) for h in runs]
        final = [h[-1]["strict"] for h in runs]
        reach = [first_reaching(h, target) for h in runs]
        reached = [r for r in reach if r == r]
        speed = statistics.mean(h[-1]["wall_s"] / h[-1]["compute"] * 1e4 for h in runs)

        def mean_sd(values):
            values = [v for v in values if v == v]  # NaN: the run ended before that compute
            if not values:
                return "n/a"
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

        reach_text = f"{statistics.mean(reached):.3g} ({len(reached)}/{len(runs)} seeds)" if reached else "not reached"
        start = statistics.mean(h[0]["strict"] for h in runs)
        lines.append(
            f"| {variant} | {len(runs)} | {start:.3f} | {mean_sd(at_equal)} | {mean_sd(final)} | {reach_text} | "
            f"{speed:.1f} |"
        )
        grid = sorted({h["compute"] for run in runs for h in run})
        curves = [[interpolate(run, c) for c in grid] for run in runs]
        mean = [
            statistics.mean(v for v in column if v == v) if any(v == v for v in column) else float("nan")
            for column in zip(*curves)
        ]
        low = [min((v for v in column if v == v), default=float("nan")) for column in zip(*curves)]
        high = [max((v for v in column if v == v), default=float("nan")) for column in zip(*curves)]
        (line,) = axis.plot(grid, mean, label=variant)
        axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
    axis.set_xlabel("denoiser forward-equivalents (forward 1, forward + backward 3)")
    axis.set_ylabel("held-out strict score")
    axis.set_title("shapes yardstick: learning per compute (band: min-max over seeds)")
    axis.legend()
    figure.tight_layout()
    plot = output_dir / "learning_per_compute.png"
    figure.savefig(plot, dpi=100)
    print("\n".join(lines))
    print(f"plot: {plot}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--eval_per_category", type=int, default=8)
    parser.add_argument("--eval_seeds", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=8)
    # 2 prompts (16 samples) per step left the v2 shapes build's held-out score moving at random; 8 let it rise
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="Sampler steps T.")
    # 1e-4: on builds 3 and 4 the default recipe rises clearly there; at 2e-4 (the tables of builds 1 and 2) it rose far
    # less on build 3 and fell on build 4 (benchmarks/RESULTS.md)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--small", action="store_true", help="Train the small build (the slow test's).")
    parser.add_argument("--model_name_or_path", help="Another saved shapes pipeline instead of the cached build.")
    parser.add_argument("--output_dir", default="bench-learning")
    parser.add_argument("--report_only", action="store_true", help="Print the table and plot of results.json.")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="With --report_only: first merge the results.json of these output folders (runs made in parallel) into "
        "--output_dir's, the runs of each variant in the order given.",
    )
    args = parser.parse_args(argv)
    if args.max_steps % args.eval_every:
        parser.error("--max_steps must be a multiple of --eval_every")
    if args.merge and not args.report_only:
        parser.error("--merge goes with --report_only")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = ShapesBuildSettings.small() if args.small else ShapesBuildSettings()
    path = args.model_name_or_path or (None if args.report_only else shapes_pipeline_path(settings))
    results_file = output_dir / "results.json"
    if args.report_only:
        if args.merge:
            merged = {"args": [], "results": {}}
            for folder in args.merge:
                part = json.loads((Path(folder) / "results.json").read_text())
                merged["args"].append(part["args"])
                for variant, runs in part["results"].items():
                    merged["results"].setdefault(variant, []).extend(runs)
            results_file.write_text(json.dumps(merged, indent=1))
        report(json.loads(results_file.read_text())["results"], output_dir)
        return
    results = {}
    for variant in args.variants:
        for seed in args.seeds:  # saved after every run: an interrupted benchmark keeps what finished
            results.setdefault(variant, []).append(run(path, variant, seed, args))
            results_file.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    report(results, output_dir)


if __name__ == "__main__":
    main()
