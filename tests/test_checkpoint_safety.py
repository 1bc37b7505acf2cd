"""Resume and output_dir: nothing lost, nothing mixed; broken or incompatible checkpoints are named, not loaded."""

import json
import logging
import os
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from trl_dancegrpo.checkpoints import CHECKPOINT_INFO_NAME

from .test_trainer import lora_config, make_trainer


SAVES = dict(max_steps=2, save_strategy="steps", save_steps=1, log_samples=False)


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
    trainer.train()
    # the earlier run's checkpoint-2 is gone, not mixed with this run's checkpoint-1
    assert sorted(p.name for p in copy_of_run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


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
    os.remove(copy_of_run / "checkpoint-2" / CHECKPOINT_INFO_NAME)  # a checkpoint written before that file existed
    with pytest.raises(ValueError, match="lora_alpha=8, this run's peft_config has lora_alpha=16"):
        resume(tiny_pipeline_path, tmp_path, peft_config=LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian"))


def test_another_model_family_is_refused(copy_of_run, tiny_pipeline_path, tmp_path):
    with pytest.raises(
        ValueError, match="it was trained on a FluxPipeline .*this run trains a StableDiffusionPipeline"
    ):
        resume(tiny_pipeline_path, tmp_path, pipeline="tiny-sd", per_device_train_batch_size=8)


def test_full_fine_tuning_from_a_lora_checkpoint_is_refused(copy_of_run, tiny_pipeline_path, tmp_path):
    settings = {**SAVES, "max_steps": 3}
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, **settings)
    with pytest.raises(ValueError, match="it holds a LoRA, this run trains otherwise"):
        trainer.train(resume_from_checkpoint=True)


# -- broken or incomplete checkpoints ---------------------------------------------------------------------------------
def test_a_truncated_lora_file_is_named_with_the_previous_checkpoint(copy_of_run, tiny_pipeline_path, tmp_path):
    path = copy_of_run / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as error:
        resume(tiny_pipeline_path, tmp_path)
    message = str(error.value)
    assert "pytorch_lora_weights.safetensors of the checkpoint" in message and "checkpoint-2" in message
    assert "resume_from_checkpoint=" in message and "checkpoint-1'" in message


def test_a_corrupted_optimizer_file_is_named(copy_of_run, tiny_pipeline_path, tmp_path):
    (copy_of_run / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"Cannot read optimizer.pt of the checkpoint .*checkpoint-2.*checkpoint-1"):
        resume(tiny_pipeline_path, tmp_path)


def test_missing_optimizer_scheduler_and_rng_files_warn(copy_of_run, tiny_pipeline_path, tmp_path, warnings_logged):
    for path in (copy_of_run / "checkpoint-2").iterdir():
        if path.name in ("optimizer.pt", "scheduler.pt") or path.name.startswith("rng_state"):
            path.unlink()
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
