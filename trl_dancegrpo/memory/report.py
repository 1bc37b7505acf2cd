"""`trl-dancegrpo estimate-memory`: the command, its printed report, its JSON, verdicts per GPU and what fits a target."""

import argparse
import json
import sys
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # the command checks its options before torch is imported: the estimator is imported when it runs
    from .estimate import MemoryEstimate

GIB = 2**30


CARDS_GB = (24, 40, 48, 80, 141)
# Dense bf16 tensor throughput (TFLOP/s, no sparsity) and memory of the GPUs `--gpu` knows, from the vendors' data
# sheets (H100/H200 SXM, A100 SXM 80 GB, L40S, GeForce RTX 4090 with FP32 accumulation).
GPUS = {
    "h100": ("NVIDIA H100 SXM", 989.4, 80),
    "h200": ("NVIDIA H200 SXM", 989.4, 141),
    "a100": ("NVIDIA A100 SXM 80GB", 312.0, 80),
    "l40s": ("NVIDIA L40S", 362.05, 48),
    "4090": ("NVIDIA GeForce RTX 4090", 165.2, 24),
}
UTILISATION = 0.4  # model FLOPs utilisation assumed for the time estimate (large transformer training reaches 0.3-0.5)
CUDA_OVERHEAD_GIB = 1.0  # CUDA context and cuBLAS/cuDNN workspaces, not in the count
ALLOCATOR_RESERVE = 0.10  # the caching allocator's reserve and fragmentation, typically 5-20%
NOT_COUNTED = (
    "Not counted: the CUDA context and cuBLAS/cuDNN workspaces (~0.5-1 GB), the caching allocator's reserve and "
    "fragmentation (typically +5-20%), NCCL buffers and DDP gradient buckets, reward models' scoring activations."
)
LABELS = {
    "denoiser_weights": "denoiser weights (frozen part)",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations of the training step",
    "frozen_modules": "frozen modules on the GPU",
    "reward_models": "reward models on the GPU",
    "rollout_forward": "rollout forward (no gradient)",
    "vae_decode": "VAE decode of a rollout slice",
    "trajectory_buffer": "trajectory buffer",
    "ema_weights": "EMA of the trained weights (float32)",
}


def gib(value: float) -> float:
    return round(value / GIB, 2)


def needed_gib(peak_bytes: int) -> float:
    """What a process of `peak_bytes` needs of a card: the count, the allocator's reserve and the CUDA context."""
    return peak_bytes * (1 + ALLOCATOR_RESERVE) / GIB + CUDA_OVERHEAD_GIB


def verdict(peak_bytes: int, card_gb: float) -> str:
    """Whether a process of `peak_bytes` fits a card, with the overheads the count leaves out."""
    needed = needed_gib(peak_bytes)
    if needed <= card_gb:
        return f"fits ({card_gb - needed:.1f} GB to spare after ~10% allocator reserve and 1 GB CUDA context)"
    if peak_bytes / GIB <= card_gb:
        return "tight (fits the count, not the ~10% allocator reserve + 1 GB CUDA context)"
    return f"does not fit (needs {peak_bytes / GIB:.1f} GB before overheads)"


def changes_for_target(estimate: "MemoryEstimate", target_gib: float) -> list[tuple[str, int]]:
    """Changes (and the peak each gives, re-derived from the same run) that bring the process under `target_gib` with
    the overheads `verdict` counts (a change is listed only where the verdict for that size would be "fits"), then
    the changes whose figure needs another run of estimate-memory (peak `None`)."""
    options, settings = estimate.options, estimate.settings
    candidates = []
    savers, labels = {}, {}
    if not options["offload_text_encoders"]:
        savers["offload_text_encoders"], labels["offload_text_encoders"] = True, "--offload_text_encoders true"
    if not options["offload_reward_models"] and estimate.parts["rewards"]:
        savers["offload_reward_models"] = True
        labels["offload_reward_models"] = "--offload_reward_models true"
    if options.get("ema") and not options.get("ema_on_cpu"):
        savers["ema_on_cpu"], labels["ema_on_cpu"] = True, "--ema_on_cpu true"
    for name in savers:
        candidates.append((labels[name], estimate.with_options(**{name: True}).peak))
    if len(savers) > 1:
        candidates.append((" + ".join(labels.values()), estimate.with_options(**savers).peak))
    for processes in (2, 4, 8) if options.get("fsdp", True) else ():  # two experts: DDP only
        if processes > options["num_processes"]:
            sharded = estimate.with_options(num_processes=processes, **savers)
            label = f"FSDP over {processes} processes (accelerate launch --config_file examples/accelerate/fsdp.yaml)"
            if savers:
                label += " with " + " + ".join(labels.values())
            candidates.append((label, sharded.peak))
    for size in (2, 4, 8) if options.get("context_parallel_plan") and options.get("fsdp", True) else ():
        if size > options.get("context_parallel", 1):
            processes = max(size, options["num_processes"])
            split = estimate.with_options(num_processes=processes, context_parallel=size, **savers)
            label = f"--context_parallel_size {size} with FSDP over {processes} processes"
            if savers:
                label += " with " + " + ".join(labels.values())
            candidates.append((label, split.peak))
    fits = [(label, peak) for label, peak in candidates if needed_gib(peak) <= target_gib]
    advice = []
    if not settings["gradient_checkpointing"]:
        advice.append(("--gradient_checkpointing true (re-run estimate-memory with it for the figure)", None))
    if settings["rollout_batch_size"] > 1:
        advice.append(
            ("a smaller --rollout_batch_size (activations scale with it; re-run estimate-memory for the figure)", None)
        )
    if settings["lora"] == "full fine-tuning":
        advice.append(("--use_peft true with a LoRA rank (re-run estimate-memory for the figure)", None))
    return fits + advice


def suggestion_target(estimate: "MemoryEstimate", target_gib: float | None) -> float | None:
    """The size to suggest changes for: `--target_gib`, else the largest card when the run fits none, else none."""
    if target_gib is not None:
        return target_gib
    return None if needed_gib(estimate.peak) <= max(CARDS_GB) else float(max(CARDS_GB))


def suggestions(estimate: "MemoryEstimate", target_gib: float | None) -> dict | None:
    """What `--json` holds under "suggestions" (the report prints the same)."""
    target = suggestion_target(estimate, target_gib)
    if target is None:
        return None
    return {
        "target_gib": target,
        "already_fits": needed_gib(estimate.peak) <= target,
        "changes": [
            {"change": label, "peak_gib": None if peak is None else gib(peak)}
            for label, peak in changes_for_target(estimate, target)
        ],
    }


def to_json(estimate: "MemoryEstimate", gpu: str | None = None, target_gib: float | None = None) -> dict:
    breakdown = estimate.breakdown
    keys = list(LABELS)[:7]
    result = {
        "model": estimate.model,
        "per_process": True,
        "num_processes": estimate.options["num_processes"],
        "context_parallel": estimate.options.get("context_parallel", 1),
        "peak_gib": gib(estimate.peak),
        "peak_phase": estimate.peak_phase,
        "training_step_peak_gib": gib(estimate.training_step_peak),
        "breakdown_gib": {key: gib(breakdown[key]) for key in keys},
        "other_gib": {key: gib(breakdown[key]) for key in list(LABELS)[7:]},
        "phases_gib": {name: gib(value) for name, value in estimate.phases.items()},
        "verdicts": {f"{card}GB": verdict(estimate.peak, card) for card in CARDS_GB},
        "settings": estimate.settings,
        "flops_per_iteration": estimate.flops_per_iteration,
        "estimate_seconds": round(estimate.seconds, 1),
        "estimate_cpu_seconds": round(estimate.cpu_seconds, 1),
        "not_counted": NOT_COUNTED,
        "notes": estimate.notes,
    }
    if gpu is not None:
        result["seconds_per_iteration_lower_bound"] = seconds_per_iteration(estimate, gpu)
    result["suggestions"] = suggestions(estimate, target_gib)
    return result


def seconds_per_iteration(estimate: "MemoryEstimate", gpu: str) -> dict:
    name, tflops, _ = GPUS[gpu]
    return {
        "gpu": name,
        "at_100_percent": estimate.flops_per_iteration / (tflops * 1e12),
        f"at_{round(UTILISATION * 100)}_percent": estimate.flops_per_iteration / (tflops * 1e12 * UTILISATION),
    }


def format_report(estimate: "MemoryEstimate", target_gib: float | None = None, gpu: str | None = None) -> str:
    s, b = estimate.settings, estimate.breakdown
    size = f"{s['height']}x{s['width']}" + (f"x{s['num_frames']}" if "num_frames" in s else "")
    processes = estimate.options["num_processes"]
    context_parallel = estimate.options.get("context_parallel", 1)
    lines = [
        f"estimate-memory: {estimate.model} ({s['pipeline']}; config: {s['config_source']})",
        f"  {size}, {s['dtype']}, {s['lora']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"{s['per_device_train_batch_size']} samples per process, {s['rollout_batch_size']} per rollout forward, "
        f"{s['training_slice']} per training forward{' (x2 with CFG)' if s['cfg'] else ''}, "
        f"{s['num_inference_steps']} steps ({s['trained_steps_per_sample']} trained per sample)",
        f"  per process{f', denoiser sharded by FSDP over {processes} processes' if processes > 1 else ''}"
        f"{f', each sequence split over {context_parallel} (context parallel)' if context_parallel > 1 else ''}; "
        f"rewards: {', '.join(s['reward_funcs'])}",
    ]
    if "trained_experts" in s:
        lines.append(
            f"  two experts: both counted in the weights; trained: {', '.join(s['trained_experts'])} (gradients and "
            "optimizer states of each); activations of one expert's training slice (one step, one expert)"
        )
    lines += [
        "",
    ]
    shown = {key: value for key, value in b.items() if key != "ema_weights" or estimate.options.get("ema")}
    lines += [f"  {LABELS[key]:<40} {gib(value):>8.2f} GiB" for key, value in shown.items()]
    lines += [
        "",
        f"  training step peak (weights + trainable + gradients + optimizer + activations): "
        f"{gib(estimate.training_step_peak):.2f} GiB",
        f"  PEAK of the process: {gib(estimate.peak):.2f} GiB, during {estimate.peak_phase}",
        "  by phase: " + ", ".join(f"{name} {gib(value):.2f}" for name, value in estimate.phases.items()),
        "",
    ]
    lines += [f"  {card:>3} GB: {verdict(estimate.peak, card)}" for card in CARDS_GB]
    advice = suggestions(estimate, target_gib)
    if advice is not None:
        reason = "" if target_gib is not None else " (it fits none of the cards above)"
        lines += ["", f"  to fit {advice['target_gib']:g} GiB with the overheads above{reason}:"]
        if advice["already_fits"]:
            lines.append("    already fits")
        for change in advice["changes"]:
            figure = change["peak_gib"]
            lines.append(
                f"    {change['change']}"
                + (f": peak {figure:.2f} GiB (needs ~{needed_gib(figure * GIB):.1f})" if figure is not None else "")
            )
        if not any(change["peak_gib"] is not None for change in advice["changes"]):
            lines.append("    (none of the changes estimated here fits; those above need a re-run for their figure)")
    lines += ["", f"  FLOPs per optimizer step (one process): {estimate.flops_per_iteration / 1e15:.2f} PFLOP"]
    if gpu is not None:
        timing = seconds_per_iteration(estimate, gpu)
        lines.append(
            f"  {timing['gpu']}: at least {timing['at_100_percent']:.1f} s/it at 100% of peak bf16 throughput, "
            f"~{list(timing.values())[2]:.1f} s/it at {round(UTILISATION * 100)}% utilisation (an estimate from "
            "FLOPs alone: no data loading, reward scoring or communication time)"
        )
    lines += ["", "  " + NOT_COUNTED]
    lines += [f"  note: {note}" for note in estimate.notes]
    lines.append(
        f"  (estimated in {estimate.seconds:.0f} s, {estimate.cpu_seconds:.0f} s of CPU time, on fake tensors)"
    )
    return "\n".join(lines)


def _own_options(argv: list[str]):
    parser = argparse.ArgumentParser(prog="trl-dancegrpo estimate-memory", add_help=False)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--target_gib", type=float, default=None)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--context_parallel", type=int, default=None)
    parser.add_argument("--gpu", choices=sorted(GPUS), default=None)
    return parser.parse_known_args(argv)


HELP = """usage: trl-dancegrpo estimate-memory --config RECIPE.yaml [training options] [--json OUT] [--target_gib N]
                                      [--num_processes N] [--context_parallel N] [--gpu h100|h200|a100|l40s|4090]

Peak GPU memory per process of a DanceGRPO run, from one run of the trainer's own code (prompt encoding, a rollout
slice, VAE decode, a training slice with backward, an optimizer step) at the real size on fake tensors: offline, on a
CPU, without weights. Every training option is accepted, exactly as for training.

  --json OUT          also write the figures as JSON
  --target_gib N      list the changes after which the run fits N GiB with the overheads the verdicts count
                      (without it, changes are listed when the run fits none of the cards)
  --num_processes N   FSDP processes the denoiser is sharded over (1: no sharding; DDP keeps everything per process)
  --context_parallel N  processes that split each sample's sequence (default: the recipe's context_parallel_size);
                      activations and sequence-sized buffers are divided by N, its communication buffers counted
  --gpu NAME          a lower bound on seconds per iteration on that GPU (from the FLOPs of the same run)
"""


def main(argv: list[str]) -> int:
    """`trl-dancegrpo estimate-memory ...` (argv without the subcommand)."""
    if {"-h", "--help"} & set(argv):
        print(HELP)
        return 0
    own, rest = _own_options(argv)
    if own.num_processes < 1:
        print("trl-dancegrpo estimate-memory: error: --num_processes must be at least 1", file=sys.stderr)
        return 2
    from ..arguments import ModelArguments, ScriptArguments, make_parser
    from ..cli_checks import precheck

    try:  # the training options' fast checks (a malformed recipe, a misspelt option), before torch is imported
        precheck(rest, (ScriptArguments, ModelArguments), check_dataset=False)
    except ValueError as error:
        print(f"trl-dancegrpo estimate-memory: error: {error}", file=sys.stderr)
        return 2
    context_parallel, rest = _context_parallel_size(own.context_parallel, rest)
    if context_parallel < 1 or (own.num_processes > 1 and own.num_processes % context_parallel):
        print(
            f"trl-dancegrpo estimate-memory: error: --context_parallel {context_parallel} must be at least 1 and "
            f"divide --num_processes {own.num_processes}",
            file=sys.stderr,
        )
        return 2
    from .estimate import estimate_memory

    parser = make_parser()
    # As it would train on a GPU: bf16 where the recipe leaves it unset (on by default on bf16 GPUs), and use_cpu so
    # that TrainingArguments accepts bf16 on this GPU-less machine (it changes nothing that is estimated).
    parser.set_defaults(bf16=True, use_cpu=True, report_to="none")
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(rest)
    except (ValueError, TypeError, OSError) as error:
        parser.error(str(error))
    if model_args.model_name_or_path is None:
        parser.error("--model_name_or_path is required (on the command line or in the --config recipe).")
    try:
        estimate = estimate_memory(
            script_args, training_args, model_args, num_processes=own.num_processes, context_parallel=context_parallel
        )
    except ValueError as error:
        parser.error(str(error).splitlines()[0])
    print(format_report(estimate, own.target_gib, own.gpu))
    if own.json_path:
        with open(own.json_path, "w", encoding="utf-8") as handle:
            json.dump(to_json(estimate, own.gpu, own.target_gib), handle, indent=1)
    return 0


def _context_parallel_size(option: int | None, rest: list[str]) -> tuple[int, list[str]]:
    """`--context_parallel`, else the training option `context_parallel_size` (command line, then the recipe); the
    training options then parse with 1: this one process estimates one process of the group, and the config's check
    that the launched processes divide into groups does not apply here."""
    import yaml

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--context_parallel_size", type=int, default=None)
    parser.add_argument("--config", default=None)
    known, _ = parser.parse_known_args(rest)
    size = option or known.context_parallel_size
    if size is None and known.config:
        with open(known.config, encoding="utf-8") as handle:
            size = (yaml.safe_load(handle) or {}).get("context_parallel_size")
    return int(size or 1), [*rest, "--context_parallel_size", "1"]
