"""Resume and output_dir: nothing lost, nothing mixed; broken or incompatible checkpoints are named, not loaded."""

import hashlib
import json
import logging
import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from trl_dancegrpo.checkpoints import CHECKPOINT_INFO_NAME, MANIFEST_NAME, write_manifest

from .test_trainer import lora_config, make_trainer


SAVES = dict(max_steps=2, save_strategy="steps", save_steps=1, log_samples=False)
# A file broken after saving is caught by the checkpoint's manifest of checksums; one broken before it was recorded (or
# in a checkpoint without a manifest) by reading it: both must name the file and the previous checkpoint.
CAUGHT_BY = pytest.mark.parametrize("caught_by", ["manifest", "reading"])


def break_after_saving(checkpoint, caught_by: str) -> None:
    """`caught_by="reading"`: the manifest records the broken files as they are (they were saved broken)."""
    if caught_by == "reading":
        write_manifest(str(checkpoint))


@pytest.fixture(scope="module")
def earlier_run(tiny_pipeline_path, tmp_path_factory):
    """An output_dir with checkpoint-1 and checkpoint-2 of a LoRA run (r=4, alpha=8)."""
    root = tmp_path_factory.mktemp("earlier")
    make_trainer(tiny_pipeline_path("tiny-flux"), root, peft_config=lora_config(), **SAVES).train()
    return root / "out"


@pytest.fixture
def copy_of_run(earlier_run, tmp_path):
    shutil.copytree(earlier_run, tmp_path / "out")
    return tmp_path / "out"


def resume(tiny_pipeline_path, tmp_path, peft_config=None, pipeline="tiny-flux", checkpoint=True, **overrides):
    settings = {**SAVES, "max_steps": 3, **overrides}
    trainer = make_trainer(
        tiny_pipeline_path(pipeline), tmp_path, peft_config=peft_config or lora_config(), **settings
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


@pytest.fixture
def warnings_logged(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING, logger="trl_dancegrpo")
    yield caplog
    hf_logging.disable_propagation()


@pytest.mark.slow
# -- one run per output_dir -------------------------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(copy_of_run, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, peft_config=lora_config(), **SAVES)
    with pytest.raises(
        ValueError, match=r"already holds checkpoints of an earlier run \(checkpoint-1, checkpoint-2\)"
    ):
        trainer.train()
    with pytest.raises(ValueError, match="resume_from_checkpoint=True.*overwrite_output_dir=True"):
        trainer.train()
    assert sorted(os.listdir(copy_of_run / "checkpoint-2")) == sorted(os.listdir(copy_of_run / "checkpoint-1"))


def test_overwrite_output_dir_starts_afresh(copy_of_run, tiny_pipeline_path, tmp_path):
    settings = {**SAVES, "max_steps": 1, "save_total_limit": 2}
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, peft_config=lora_config(), overwrite_output_dir=True, **settings
    )
    (copy_of_run / "_samples").mkdir()
    (copy_of_run / "_samples" / "step-000002.png").write_bytes(b"an earlier run's sample")
    (copy_of_run / "runs" / "Dec01_00-00-00_host").mkdir(parents=True)  # TensorBoard's default folder
    (copy_of_run / "metrics.json").write_text("[]")
    (copy_of_run / "notes.txt").write_text("the user's own file")
    trainer.train()
    # the earlier run's checkpoint-2 is gone, not mixed with this run's checkpoint-1
    assert sorted(p.name for p in copy_of_run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    # its samples and TensorBoard logs too; what the user wrote stays
    assert not (copy_of_run / "_samples").exists() and not (copy_of_run / "runs").exists()
    assert not (copy_of_run / "metrics.json").exists()
    assert (copy_of_run / "notes.txt").read_text() == "the user's own file"


def test_what_an_earlier_run_wrote_is_told_from_the_users_files(tmp_path):
    from trl_dancegrpo.checkpoints import previous_run_outputs

    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "config.json").write_text("{}")
    assert previous_run_outputs(str(tmp_path)) == []  # no sign of a run: nothing is ours
    (tmp_path / "training_args.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "transformer_2").mkdir()
    (tmp_path / "transformer_2" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    found = {os.path.basename(path) for path in previous_run_outputs(str(tmp_path))}
    assert found == {"training_args.json", "config.json", "diffusion_pytorch_model.safetensors", "transformer_2"}
    (tmp_path / "README.md").write_text("---\nlibrary_name: diffusers\ntags:\n- trl-dancegrpo\n---\n# a card")
    assert "README.md" in {os.path.basename(path) for path in previous_run_outputs(str(tmp_path))}


def test_resuming_continues_the_earlier_run(copy_of_run, tiny_pipeline_path, tmp_path):
    trainer = resume(tiny_pipeline_path, tmp_path)
    assert trainer.state.global_step == 3


# -- compatibility ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "peft_config, message",
    [
        (
            LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian"),
            "its LoRA has lora_alpha=8, this run's peft_config has lora_alpha=16",
        ),
        (
            LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian"),
            "its LoRA has r=4, this run's peft_config has r=8",
        ),
        (
            LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], init_lora_weights="gaussian"),
            "its LoRA has target_modules=",
        ),
    ],
    ids=["alpha", "rank", "targets"],
)
def test_a_different_lora_is_refused(peft_config, message, copy_of_run, tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-2: {message}"):
        resume(tiny_pipeline_path, tmp_path, peft_config=peft_config)


def test_a_different_lora_alpha_is_refused_from_the_adapter_metadata_alone(copy_of_run, tiny_pipeline_path, tmp_path):
    for name in (CHECKPOINT_INFO_NAME, MANIFEST_NAME):  # a checkpoint written before these files existed
        os.remove(copy_of_run / "checkpoint-2" / name)
    with pytest.raises(ValueError, match="lora_alpha=8, this run's peft_config has lora_alpha=16"):
        resume(tiny_pipeline_path, tmp_path, peft_config=LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian"))


def test_another_model_family_is_refused(copy_of_run, tiny_pipeline_path, tmp_path):
    with pytest.raises(
        ValueError, match="it was trained on a FluxPipeline .*this run trains a StableDiffusionPipeline"
    ):
        resume(tiny_pipeline_path, tmp_path, pipeline="tiny-sd", per_device_train_batch_size=8)


def test_another_algorithm_is_refused(copy_of_run, tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="it was trained with algorithm='grpo', this run uses algorithm='nft'"):
        resume(tiny_pipeline_path, tmp_path, algorithm="nft")


def test_full_fine_tuning_from_a_lora_checkpoint_is_refused(copy_of_run, tiny_pipeline_path, tmp_path):
    settings = {**SAVES, "max_steps": 3}
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, **settings)
    with pytest.raises(
        ValueError,
        match=r"it holds a LoRA adapter \(r=4, lora_alpha=8, target_modules=\[.*\]\), this run trains the full "
        r"denoiser \(FluxTransformer2DModel\)",
    ):
        trainer.train(resume_from_checkpoint=True)


# -- broken or incomplete checkpoints ---------------------------------------------------------------------------------
@CAUGHT_BY
def test_a_truncated_lora_file_is_named_with_the_previous_checkpoint(
    caught_by, copy_of_run, tiny_pipeline_path, tmp_path
):
    path = copy_of_run / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    break_after_saving(copy_of_run / "checkpoint-2", caught_by)
    with pytest.raises(ValueError) as error:
        resume(tiny_pipeline_path, tmp_path)
    message = str(error.value)
    assert "pytorch_lora_weights.safetensors of the checkpoint" in message and "checkpoint-2" in message
    assert "resume_from_checkpoint=" in message and "checkpoint-1'" in message
    assert ("changed after it was saved" in message) == (caught_by == "manifest")


@CAUGHT_BY
@pytest.mark.parametrize("content", [b"not a torch file", "an empty list"], ids=["garbage", "wrong-content"])
def test_a_corrupted_optimizer_file_is_named(caught_by, content, copy_of_run, tiny_pipeline_path, tmp_path):
    path = copy_of_run / "checkpoint-2" / "optimizer.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # loads, then fails inside the optimizer's load_state_dict
        torch.save([], path)
    break_after_saving(copy_of_run / "checkpoint-2", caught_by)
    with pytest.raises(ValueError, match=r"Cannot read optimizer.pt of the checkpoint .*checkpoint-2.*checkpoint-1"):
        resume(tiny_pipeline_path, tmp_path)


@pytest.mark.parametrize("name", ["rng_state.pth", "trainer_state.json", "scheduler.pt", MANIFEST_NAME])
def test_every_unreadable_checkpoint_file_is_named(name, copy_of_run, tiny_pipeline_path, tmp_path):
    path = copy_of_run / "checkpoint-2" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    if name != MANIFEST_NAME:
        write_manifest(str(copy_of_run / "checkpoint-2"))  # saved so: only reading it can tell
    with pytest.raises(
        ValueError, match=rf"Cannot read {re.escape(name)} of the checkpoint .*checkpoint-2.*checkpoint-1"
    ):
        resume(tiny_pipeline_path, tmp_path)


def test_a_lora_file_changed_after_saving_is_caught_by_the_manifest(copy_of_run, tiny_pipeline_path, tmp_path):
    path = str(copy_of_run / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    weights = {name: torch.randn_like(value) for name, value in load_file(path).items()}  # finite, same shapes
    save_file(weights, path, metadata=metadata)
    manifest = json.loads((copy_of_run / "checkpoint-2" / MANIFEST_NAME).read_text())
    assert manifest["files"]["pytorch_lora_weights.safetensors"]["size"] == os.path.getsize(path)  # same size
    with pytest.raises(
        ValueError, match=r"pytorch_lora_weights.safetensors of the checkpoint .*checkpoint-2 \(changed"
    ):
        resume(tiny_pipeline_path, tmp_path)
    os.remove(copy_of_run / "checkpoint-2" / "scheduler.pt")
    write_manifest(str(copy_of_run / "checkpoint-2"))
    os.remove(copy_of_run / "checkpoint-2" / "rng_state.pth")
    with pytest.raises(ValueError, match=r"Cannot read rng_state.pth of the checkpoint .*\(missing: it was saved"):
        resume(tiny_pipeline_path, tmp_path)


def test_the_manifest_lists_every_file_of_the_checkpoint(earlier_run):
    folder = earlier_run / "checkpoint-2"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == {p.name for p in folder.iterdir() if p.name != MANIFEST_NAME}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (folder / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_missing_optimizer_scheduler_and_rng_files_warn(copy_of_run, tiny_pipeline_path, tmp_path, warnings_logged):
    for path in (copy_of_run / "checkpoint-2").iterdir():
        if path.name in ("optimizer.pt", "scheduler.pt") or path.name.startswith("rng_state"):
            path.unlink()
    write_manifest(str(copy_of_run / "checkpoint-2"))  # saved without them (save_only_model=True, say)
    trainer = resume(tiny_pipeline_path, tmp_path)
    assert trainer.state.global_step == 3
    assert "has no optimizer, no scheduler, no RNG state file" in warnings_logged.text


def test_nan_weights_are_reported_as_such(copy_of_run, tiny_pipeline_path, tmp_path):
    path = str(copy_of_run / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, path, metadata=metadata)
    write_manifest(str(copy_of_run / "checkpoint-2"))  # saved so: training had diverged before that checkpoint
    with pytest.raises(ValueError, match=r"weights loaded from .*checkpoint-2 are not finite \(NaN or inf in .*lora"):
        resume(tiny_pipeline_path, tmp_path)


def test_checkpoints_record_what_they_were_trained_with(earlier_run):
    info = json.loads((earlier_run / "checkpoint-1" / CHECKPOINT_INFO_NAME).read_text())
    assert info["pipeline"] == "FluxPipeline" and info["lora"]["r"] == 4 and info["lora"]["lora_alpha"] == 8
    assert info["trainable_parameters"] and all("lora" in name for name in info["trainable_parameters"])


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_would_not_overwrite_the_later_ones(
    copy_of_run, tiny_pipeline_path, tmp_path
):
    before = sorted(os.listdir(copy_of_run / "checkpoint-2"))
    with pytest.raises(ValueError, match=r"would overwrite the later checkpoints .*\(checkpoint-2\)"):
        resume(tiny_pipeline_path, tmp_path, checkpoint=str(copy_of_run / "checkpoint-1"))
    assert sorted(os.listdir(copy_of_run / "checkpoint-2")) == before
    # asked for explicitly, the resumed run replaces them
    trainer = resume(
        tiny_pipeline_path, tmp_path, checkpoint=str(copy_of_run / "checkpoint-1"), overwrite_output_dir=True
    )
    assert trainer.state.global_step == 3
