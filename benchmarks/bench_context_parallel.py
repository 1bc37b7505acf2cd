"""Overhead of context parallelism: one denoiser forward + backward on one sample, by 1 process vs 2 processes that
split its sequence (diffusers' Ulysses attention through `trl_dancegrpo.parallel`), side by side in one run.

    python benchmarks/bench_context_parallel.py [--tokens 4096] [--repeats 5] [--device cpu|cuda] [--type ring]

Each process uses one thread (CPU) or one GPU (2 GPUs needed; bfloat16 there). `--type ring` (CUDA only) passes
key/value chunks instead of the Ulysses all-to-alls. Prints the median seconds of each and the ratio 2-process / 1-process:
0.5 would be a perfect split, above it the all-to-alls' cost, 1.0 no gain. The same input and weights in both; the
largest difference of the outputs is printed as a check that both computed the same thing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch


def build(tokens: int, device: str):
    """A FLUX-shaped transformer (2 + 4 blocks, 4 heads of 64) and one sample of `tokens` image tokens."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=128,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=[16, 24, 24],
    ).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    generator = torch.Generator().manual_seed(1)
    side = int(tokens**0.5)
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, generator=generator),
        encoder_hidden_states=torch.randn(1, 64, 128, generator=generator),
        pooled_projections=torch.randn(1, 64, generator=generator),
        timestep=torch.tensor([0.5]),
        img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], dim=1),
        txt_ids=torch.zeros(64, 3),
        guidance=torch.tensor([3.5]),
    )
    dtype = next(model.parameters()).dtype
    return model, {
        key: value.to(device, dtype if value.is_floating_point() else None) for key, value in inputs.items()
    }


def measure(model, inputs, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, output = [], None
    for i in range(repeats + 1):  # the first is a warm-up
        if inputs["hidden_states"].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = model(**inputs, return_dict=False)[0]
        output.square().mean().backward()
        if output.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    # through numpy: the gathered output is a collective's tensor subclass, which `torch.load` refuses
    return times, torch.from_numpy(output.detach().float().cpu().numpy())


def worker(args) -> None:
    """One of the 2 processes (under torchrun)."""
    from trl_dancegrpo.parallel import enable_context_parallel

    backend = "nccl" if args.device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank()
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    model, inputs = build(args.tokens, device.type)
    enable_context_parallel([model], SimpleNamespace(), 2, args.type, device)
    times, output = measure(model, inputs, args.repeats)
    if rank == 0:
        with open(args.out, "w") as handle:
            json.dump({"times": times}, handle)
        torch.save(output, args.out + ".pt")
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--type", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        return worker(args)

    model, inputs = build(args.tokens, args.device)
    single, expected = measure(model, inputs, args.repeats)
    del model
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--worker"]
        command += ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--device", args.device]
        command += ["--type", args.type]
        subprocess.run([*command, "--out", out], check=True, env=env, capture_output=True)
        with open(out) as handle:
            double = json.load(handle)["times"]
        difference = (torch.load(out + ".pt") - expected).abs().max().item()
    one, two = statistics.median(single), statistics.median(double)
    print(f"denoiser forward + backward, 1 sample of {args.tokens} image + 64 text tokens, {args.device}:")
    print(f"  1 process:                       {one:.3f} s (median of {args.repeats})")
    print(f"  2 processes, context parallel:   {two:.3f} s ({args.type})")
    print(f"  ratio 2-process / 1-process:     {two / one:.2f} (0.50 = a perfect split)")
    print(f"  largest output difference:       {difference:.2e}")


if __name__ == "__main__":
    main()
