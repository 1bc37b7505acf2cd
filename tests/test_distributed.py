"""`accelerate launch --num_processes 2` on CPU trains and computes the same group advantages as one process.

Per device 6 samples with G = 4: the second group straddles the two processes, so its statistics are only right if
rewards are gathered across processes before normalising.
"""

import os
import subprocess
import sys

import torch


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_and_dump.py")


def run(args, out_dir, timeout=300):
    # ACCELERATE_USE_CPU: the processes that torchrun starts form a MULTI_CPU (gloo) group instead of looking for GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


def test_two_processes_match_one(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "12"], tmp_path / "one")
    # `--cpu` would pick accelerate's MPI launcher; torchrun's launcher plus ACCELERATE_USE_CPU runs CPU processes
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run([*launcher, SCRIPT, path, str(tmp_path / "two"), "6"], tmp_path / "two")

    one = torch.load(single / "rank0.pt")
    two = [torch.load(double / f"rank{r}.pt") for r in (0, 1)]
    advantages_two = torch.cat([two[0]["advantages"], two[1]["advantages"]])
    assert advantages_two.shape == (12,)
    torch.testing.assert_close(advantages_two, one["advantages"], rtol=1e-4, atol=1e-5)
    # DDP averages the two processes' gradients: the update is the single-process one
    torch.testing.assert_close(two[0]["params"], two[1]["params"])
    torch.testing.assert_close(two[0]["params"], one["params"], rtol=1e-4, atol=1e-6)
