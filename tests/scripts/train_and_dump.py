"""Train a tiny pipeline, then dump this process's first advantages, the weights and an evaluation (for test_distributed).

    train_and_dump.py PIPELINE OUT_DIR PER_DEVICE [--lora] [--max_steps N] [--save_steps N] [--resume CKPT]
        [--num_frames F] [--steps_per_generation N] [--cpu_fsdp] [--sde_window START] [--conditioning image|video]
        [--guidance_scale S] [--ema_decay D] [--context_parallel N] [--algorithm NAME]

Writes `OUT_DIR/rank{r}.pt` per process and the saved model (`trainer.save_model`) into `OUT_DIR/final` (with
`--ema_decay`, the EMA's weights into `OUT_DIR/final/ema`).
"""

import argparse


parser = argparse.ArgumentParser()
parser.add_argument("pipeline")
parser.add_argument("out_dir")
parser.add_argument("per_device", type=int)
parser.add_argument("--lora", action="store_true")
parser.add_argument("--max_steps", type=int, default=1)
parser.add_argument("--save_steps", type=int, default=0)
parser.add_argument("--resume", default=None)
parser.add_argument("--num_frames", type=int, default=None, help="for video pipelines")
parser.add_argument("--steps_per_generation", type=int, default=None, help="reuse each rollout for N micro-steps")
parser.add_argument("--cpu_fsdp", action="store_true", help="FSDP in CPU processes (see cpu_fsdp.py)")
parser.add_argument("--sde_window", type=int, default=None, help="a one-step SDE window at this step")
parser.add_argument("--ema_decay", type=float, default=None, help="keep an EMA of the trained weights")
parser.add_argument("--guidance_scale", type=float, default=None, help="the family's default if unset")
parser.add_argument("--context_parallel", type=int, default=1, help="context_parallel_size (Ulysses)")
parser.add_argument("--algorithm", default="grpo", help="DanceGRPOConfig.algorithm (grpo, grpo_guard, nft, awm)")
parser.add_argument(
    "--conditioning", choices=["image", "video"], default=None, help="an 'image' or 'video' column (solid colours)"
)
cli = parser.parse_args()
if cli.cpu_fsdp:
    import cpu_fsdp  # noqa: F401  (before accelerate builds its state)

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer  # noqa: E402
from trl_dancegrpo.rewards import brightness  # noqa: E402


transformers.logging.set_verbosity_error()
args = DanceGRPOConfig(
    output_dir=cli.out_dir,
    num_generations=4,
    num_inference_steps=3,
    per_device_train_batch_size=cli.per_device,
    per_device_eval_batch_size=2,
    rollout_batch_size=2,  # the same forward shapes whatever the number of processes
    max_steps=cli.max_steps,
    height=32,
    width=32,
    learning_rate=1e-1,
    optim="sgd",
    report_to="none",
    save_strategy="steps" if cli.save_steps else "no",
    save_steps=cli.save_steps or 500,
    disable_tqdm=True,
    context_parallel_size=cli.context_parallel,
    algorithm=cli.algorithm,
    **({"num_frames": cli.num_frames} if cli.num_frames else {}),
    **({"sde_window_size": 1, "sde_window_range": [cli.sde_window, cli.sde_window + 1]} if cli.sde_window else {}),
    **({"steps_per_generation": cli.steps_per_generation} if cli.steps_per_generation else {}),
    **({"ema_decay": cli.ema_decay} if cli.ema_decay else {}),
    **({"guidance_scale": cli.guidance_scale} if cli.guidance_scale is not None else {}),
)
peft_config = None
if cli.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")


def rows(prompts: list[str]) -> Dataset:
    """The prompts, with a conditioning column of one colour per row (a video: its frames brightening) if asked."""
    columns = {"prompt": prompts}
    colours = [(200, 40, 40), (40, 180, 60), (30, 60, 200), (120, 120, 120)]
    if cli.conditioning == "image":
        columns["image"] = [Image.new("RGB", (32, 32), colours[i % 4]) for i in range(len(prompts))]
    elif cli.conditioning == "video":
        frames = cli.num_frames or 5
        columns["video"] = [
            [Image.new("RGB", (32, 32), tuple(min(255, c + 20 * f) for c in colours[i % 4])) for f in range(frames)]
            for i in range(len(prompts))
        ]
    return Dataset.from_dict(columns)


trainer = DanceGRPOTrainer(
    cli.pipeline,
    brightness,
    args=args,
    train_dataset=rows(["a cat", "a dog", "a car", "a tree"]),
    eval_dataset=rows(["a red house", "a boat", "a green hill"]),  # 3: uneven over 2
    peft_config=peft_config,
)
captured = {}
generate_and_score = trainer._generate_and_score


def generate_and_capture(inputs):
    batch = generate_and_score(inputs)
    captured.setdefault("batch", batch)  # the first rollout's
    return batch


trainer._generate_and_score = generate_and_capture
initial = None if trainer.is_fsdp_enabled else torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
trainer.train(resume_from_checkpoint=cli.resume)
metrics = trainer.evaluate()
trainer.save_model(f"{cli.out_dir}/final")  # every process: under FSDP the shards are gathered
rank = trainer.accelerator.process_index
dump = {"eval": metrics, "total_train_batch_size": trainer.get_total_train_batch_size(args)}
if "batch" in captured:
    dump["advantages"] = captured["batch"]["advantages"].cpu()
if not trainer.is_fsdp_enabled:  # FSDP's parameters are shards: the test reads `final` instead
    dump["params"] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).cpu()
    dump["initial_params"] = initial.cpu()
dump["context_parallel"] = getattr(trainer.denoiser, "_parallel_config", None) is not None
torch.save(dump, f"{cli.out_dir}/rank{rank}.pt")
trainer.accelerator.end_training()  # tear the process group down before the interpreter exits
