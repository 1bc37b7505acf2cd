"""`accelerate launch --num_processes 2` on CPU (DDP, and FSDP2) trains and evaluates as one process does.

Per device 6 samples with G = 4: the second group straddles the two processes, so its statistics are only right if
rewards are gathered across processes before normalising. Three evaluation prompts split unevenly over two processes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel
from safetensors.torch import load_file


pytestmark = pytest.mark.slow  # each test launches several multi-process runs

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_and_dump.py")


def run(args, out_dir, timeout=300):
    # ACCELERATE_USE_CPU: the processes that torchrun starts form a MULTI_CPU (gloo) group instead of looking for GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no"]
# the options of examples/accelerate/fsdp.yaml, with tiny FLUX's block classes
FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
FSDP += ["--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_reshard_after_forward", "true"]
FSDP += ["--fsdp_cpu_ram_efficient_loading", "true"]  # the trainer turns it off (see test_fsdp_other_denoisers)


def fsdp_wrap(block_classes: str) -> list[str]:
    return ["--fsdp_transformer_layer_cls_to_wrap", block_classes]


def saved_weights(folder, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        return load_file(folder / "pytorch_lora_weights.safetensors")
    return FluxTransformer2DModel.from_pretrained(folder).state_dict()


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("window", [[], ["--sde_window", "1"]], ids=["full-trajectory", "window-after-shared-prefix"])
def test_two_processes_match_one(window, tiny_pipeline_path, tmp_path):
    # with a window at step 1, step 0 runs once per group, and the second group's rows live on both processes
    assert_two_processes_match_one(tiny_pipeline_path("tiny-flux"), tmp_path, [*window, "--ema_decay", "0.5"])


def assert_two_processes_match_one(path, tmp_path, extra=()) -> None:
    """DDP on two processes (6 samples each, G = 4: the second group straddles them) gives one process's advantages,
    update and evaluation (12 samples). `extra`: more options of `train_and_dump.py` (frames, a conditioning column)."""
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "12", *extra], tmp_path / "one")
    # `--cpu` would pick accelerate's MPI launcher; torchrun's launcher plus ACCELERATE_USE_CPU runs CPU processes
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run([*launcher, SCRIPT, path, str(tmp_path / "two"), "6", *extra], tmp_path / "two")

    one = torch.load(single / "rank0.pt")
    two = [torch.load(double / f"rank{r}.pt") for r in (0, 1)]
    advantages_two = torch.cat([two[0]["advantages"], two[1]["advantages"]])
    assert advantages_two.shape == (12,)
    torch.testing.assert_close(advantages_two, one["advantages"], rtol=1e-4, atol=1e-5)
    # DDP averages the two processes' gradients: the update is the single-process one
    torch.testing.assert_close(two[0]["params"], two[1]["params"])
    torch.testing.assert_close(two[0]["params"], one["params"], rtol=1e-4, atol=1e-6)
    if "--ema_decay" in extra:  # the EMA (each DDP process keeps a whole copy; the main one saves it) is the same
        ema = saved_weights(double / "final" / "ema", False)
        assert_same_weights(ema, saved_weights(single / "final" / "ema", False))
    # evaluation: 3 prompts over 2 processes (2 + 1 padded), every prompt scored once, as by one process
    for rank in (0, 1):
        assert two[rank]["eval"].keys() == one["eval"].keys()
        for key in one["eval"]:
            assert two[rank]["eval"][key] == pytest.approx(one["eval"][key], abs=1e-5), key


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_two_processes_match_one_and_resume_exactly(lora, tiny_pipeline_path, tmp_path):
    """FSDP2 (sharded parameters, gathered forward in the rollout) updates as one process; a resume is exact."""
    path, extra = tiny_pipeline_path("tiny-flux"), ["--lora"] * lora + ["--max_steps", "2", "--ema_decay", "0.5"]
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", *extra], tmp_path / "one")
    fsdp = [*LAUNCH, *FSDP, *fsdp_wrap("FluxTransformerBlock,FluxSingleTransformerBlock"), SCRIPT]
    sharded = run(
        [*fsdp, path, str(tmp_path / "two"), "4", *extra, "--save_steps", "1", "--cpu_fsdp"], tmp_path / "two"
    )

    # the saved model is the complete one, in the same format as without FSDP
    assert_same_weights(saved_weights(sharded / "final", lora), saved_weights(single / "final", lora))
    # so is the EMA, kept shard by shard on each process and gathered to be saved
    ema = saved_weights(sharded / "final" / "ema", lora)
    assert_same_weights(ema, saved_weights(single / "final" / "ema", lora))
    assert any(not torch.equal(ema[key], value) for key, value in saved_weights(sharded / "final", lora).items())
    assert {"ema_state_0.safetensors", "ema_state_1.safetensors"} <= set(os.listdir(sharded / "checkpoint-1"))
    if not lora:
        config = (sharded / "final" / "config.json").read_text()
        assert '"_class_name": "FluxTransformer2DModel"' in config  # not FSDP's FSDPFluxTransformer2DModel
    one, two = torch.load(single / "rank0.pt"), [torch.load(sharded / f"rank{r}.pt") for r in (0, 1)]
    for key in one["eval"]:
        assert two[0]["eval"][key] == pytest.approx(one["eval"][key], abs=1e-5), key

    # resume from the first checkpoint (sharded model and optimizer state, RNG of each process) to step 2
    checkpoint = sharded / "checkpoint-1"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()
    resumed = run(
        [*fsdp, path, str(tmp_path / "re"), "4", *extra, "--resume", str(checkpoint), "--cpu_fsdp"], tmp_path / "re"
    )
    for folder in ("final", "final/ema"):  # the weights and the EMA restored shard by shard
        straight = saved_weights(sharded / folder, lora)
        again = saved_weights(resumed / folder, lora)
        for key in straight:
            torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=f"{folder}: {key}")


@pytest.mark.parametrize(
    "name, denoiser_class, blocks, extra",
    [
        # a parameter at the model's root (`scale_shift_table`), a video
        ("tiny-wan", WanTransformer3DModel, "WanTransformerBlock", ["--num_frames", "5"]),
        # a persistent buffer (`pos_embed.pos_embed`), CFG in one batched forward
        ("tiny-sd3", SD3Transformer2DModel, "JointTransformerBlock", []),
    ],
)
def test_fsdp_other_denoisers(name, denoiser_class, blocks, extra, tiny_pipeline_path, tmp_path):
    """What accelerate's rank-0 loader cannot take (it is turned off) trains under FSDP2 as in one process."""
    path = tiny_pipeline_path(name)
    single = run([sys.executable, SCRIPT, path, str(tmp_path / "one"), "8", *extra], tmp_path / "one")
    fsdp = [*LAUNCH, *FSDP, *fsdp_wrap(blocks), SCRIPT, path, str(tmp_path / "two"), "4", *extra, "--cpu_fsdp"]
    sharded = run(fsdp, tmp_path / "two")
    expected = denoiser_class.from_pretrained(single / "final").state_dict()
    got = denoiser_class.from_pretrained(sharded / "final").state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_command_line_runs_under_accelerate_launch(tmp_path):
    """`accelerate launch -m trl_dancegrpo` (the recipes' launch line) on two processes: one set of files, one print."""
    out = tmp_path / "demo"
    args = [*LAUNCH, "--multi_gpu", "-m", "trl_dancegrpo", "--output_dir", str(out), "--max_steps", "2"]
    args += ["--per_device_train_batch_size", "8", "--disable_tqdm", "true"]  # the built-in tiny demo otherwise
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Saved the LoRA") == 1  # the main process reports
    history = json.loads((out / "metrics.json").read_text())
    assert sum("rewards/brightness/mean" in log for log in history) == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()
