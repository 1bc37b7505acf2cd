"""A multi-node run, simulated on this machine: two `accelerate launch --num_machines 2 --machine_rank 0/1` invocations
(one process each, rendezvous at 127.0.0.1) train, checkpoint and resume exactly as one 2-process launch does.

The two "machines" share this filesystem, as nodes sharing a network filesystem do: the global main process writes
the model and trainer state, each process its RNG state and its part of the rollout buffer.
"""

import os
import socket
import subprocess

import pytest
import torch

from .test_distributed import LAUNCH, SCRIPT, run


pytestmark = pytest.mark.slow  # three 2-process runs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_two_machines(script_args: list[str], timeout: int = 400) -> None:
    """The same command on two "machines" (machine_rank 0 and 1), 1 process each: 2 processes in all."""
    port = str(free_port())
    common = [*LAUNCH[:3], "--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--main_process_ip"]
    common += ["127.0.0.1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]
    machines = [
        subprocess.Popen(
            [*common, "--machine_rank", str(rank), SCRIPT, *script_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=timeout) for machine in machines]
    for rank, (machine, (_, stderr)) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank}: {stderr[-3000:]}"


def test_two_machines_train_checkpoint_and_resume_like_one(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    # a reused rollout (steps_per_generation 2): each process saves its part of the rollout that step 2 still trains
    # on, and the resume from step 1 continues inside it (the suite's only multi-process test of that with DDP)
    options = ["4", "--lora", "--steps_per_generation", "2", "--max_steps", "3"]
    one_machine = [*LAUNCH[:3], "--multi_gpu", *LAUNCH[3:], SCRIPT]
    run([*one_machine, path, str(tmp_path / "one"), *options], tmp_path)
    run_on_two_machines([path, str(tmp_path / "two"), *options, "--save_steps", "1"])
    checkpoint = tmp_path / "two" / "checkpoint-1"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert {p.name for p in checkpoint.glob("rollout_buffer_*.pt")} == {"rollout_buffer_0.pt", "rollout_buffer_1.pt"}
    run_on_two_machines([path, str(tmp_path / "re"), *options, "--resume", str(checkpoint)])

    for rank in (0, 1):
        expected = torch.load(tmp_path / "one" / f"rank{rank}.pt")
        for name in ("two", "re"):
            got = torch.load(tmp_path / name / f"rank{rank}.pt")
            torch.testing.assert_close(got["params"], expected["params"], rtol=0, atol=0, msg=f"{name}, rank {rank}")
        first_rollout = torch.load(tmp_path / "two" / f"rank{rank}.pt")["advantages"]
        torch.testing.assert_close(first_rollout, expected["advantages"], rtol=0, atol=0)
    evaluation = torch.load(tmp_path / "one" / "rank0.pt")["eval"]
    assert torch.load(tmp_path / "re" / "rank0.pt")["eval"] == evaluation
    # the main process (machine 0) saved the model once
    assert (tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors").is_file()
