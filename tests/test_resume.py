"""Checkpoints hold everything: a run stopped and resumed ends exactly where an uninterrupted run ends."""

import os

import pytest
import torch
from transformers import TrainerCallback

from .test_trainer import lora_config, make_trainer


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def rewards_by_step(trainer):
    return {
        log["step"]: log["rewards/brightness/mean"]
        for log in trainer.state.log_history
        if "rewards/brightness/mean" in log
    }


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", dataloader_drop_last=False)

    def trainer(out):
        return make_trainer(path, out, peft_config=lora_config() if use_lora else None, **settings)

    straight = trainer(tmp_path / "straight")
    straight.train()

    first = trainer(tmp_path / "resumed")
    first.add_callback(StopAt(2))
    first.train()
    assert first.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()

    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    assert torch.equal(params(second), params(straight))
    resumed_rewards = {**rewards_by_step(first), **rewards_by_step(second)}
    assert resumed_rewards == rewards_by_step(straight)
    assert len(resumed_rewards) == 4


def assert_resume_continues_exactly(make, tmp_path, steps: int = 4, stop: int = 2):
    """A run stopped at `stop` (a checkpoint there) and resumed ends on the uninterrupted run's weights and rewards.
    `make(out)` builds the trainer writing into `out`, saving every `stop` steps, `steps` steps in all. Returns the
    uninterrupted, the stopped and the resumed trainers, for more checks."""
    straight = make(tmp_path / "straight")
    straight.train()
    first = make(tmp_path / "resumed")
    first.add_callback(StopAt(stop))
    first.train()
    assert first.state.global_step == stop
    second = make(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == steps
    assert torch.equal(params(second), params(straight))
    assert {**rewards_by_step(first), **rewards_by_step(second)} == rewards_by_step(straight)
    return straight, first, second


@pytest.mark.slow
def test_interrupted_save_is_not_taken_for_a_checkpoint(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    trainer = make_trainer(path, tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer.train()
    out = tmp_path / "out"
    saves = sorted(name for name in os.listdir(out) if "checkpoint" in name)
    assert saves == ["checkpoint-2"]  # save_total_limit honoured, no staging folder left
    # a save that died half-way: only its staging folder exists
    os.makedirs(out / "tmp-checkpoint-3")
    (out / "tmp-checkpoint-3" / "trainer_state.json").write_text("{}")
    resumed = make_trainer(path, tmp_path, max_steps=3, save_strategy="no")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3  # continued from checkpoint-2, not from the broken folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "reuse",
    [{"steps_per_generation": 2}, {"num_iterations": 2}],
    ids=["steps_per_generation", "num_iterations"],
)
def test_resume_inside_a_reused_rollout_continues_exactly(reuse, tiny_pipeline_path, tmp_path):
    # one rollout feeds two optimizer steps: checkpoint-1 falls inside it, so it must carry the rollout
    path = tiny_pipeline_path("tiny-flux")
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=1, save_strategy="steps", log_samples=False, **reuse)

    def trainer(out):
        return make_trainer(path, out, peft_config=lora_config(), **settings)

    straight = trainer(tmp_path / "straight")
    straight.train()

    first = trainer(tmp_path / "resumed")
    first.add_callback(StopAt(1))
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-1"
    assert (checkpoint / "rollout_buffer.pt").is_file()
    assert not (tmp_path / "resumed" / "out" / "checkpoint-2").exists()

    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == 4
    assert torch.equal(params(second), params(straight))
    # a checkpoint at a rollout boundary has nothing to carry
    assert not (tmp_path / "straight" / "out" / "checkpoint-2" / "rollout_buffer.pt").exists()
