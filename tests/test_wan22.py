"""Wan 2.2 A14B text-to-video (`WanPipeline` with two experts) and TI2V-5B (`expand_timesteps`) on tiny models loaded
from disk (32x32 px, 5 frames): each step goes to the expert the pipeline would use, both experts (or the one chosen)
train, and the LoRA files load with diffusers' own two-expert loader."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from trl_dancegrpo import DanceGRPOConfig

from .test_resume import StopAt, params
from .test_trainer import (
    assert_first_step_on_policy,
    assert_only_trainable_parameters_changed,
    lora_config,
    snapshot_parameters,
)
from .test_video import make_video_trainer, one_thread  # noqa: F401 (fixture)


CALL = dict(prompt="a blue house", height=32, width=32, num_frames=5, num_inference_steps=4, output_type="pt")
CALL["max_sequence_length"] = 16
EXPERTS = ("transformer", "transformer_2")
LORA_FILES = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"]


def record_experts(pipeline, seen: list):
    """Hooks that log which expert runs each forward, with its timesteps and batch size."""
    return [
        getattr(pipeline, name).register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen.append((name, kwargs["hidden_states"].shape[0])), with_kwargs=True
        )
        for name in EXPERTS
    ]


@pytest.mark.parametrize(
    "train_experts, use_lora",
    [(None, False), (None, True), (["transformer"], True), (["transformer_2"], False)],
    ids=["both-full", "both-lora", "high-lora", "low-full"],
)
def test_train(train_experts, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(
        "tiny-wan22",
        tiny_pipeline_path,
        tmp_path,
        peft_config=lora_config() if use_lora else None,
        train_experts=train_experts,
        timestep_fraction=1.0,  # every step trained, so both experts get gradients whatever the draw
    )
    trained = train_experts or list(EXPERTS)
    before = snapshot_parameters(trainer)
    for name in EXPERTS:  # the trained experts' parameters (LoRA: only LoRA), nothing of the other
        trainable = [n for n in before["trainable"] if n.startswith(f"{name}.")]
        assert bool(trainable) == (name in trained), name
        assert all("lora" in n for n in trainable) == use_lora or not trainable
    assert before["others"] and not any(key.startswith(EXPERTS) for key in before["others"])
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)  # the expert left out stays exactly as it was
    assert_first_step_on_policy(trainer)


def test_each_step_uses_the_pipelines_expert(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer("tiny-wan22", tiny_pipeline_path, tmp_path, max_steps=1)
    pipeline = trainer.pipeline
    assert trainer.adapter.use_cfg and trainer.adapter.guidance_scale == 4.0
    seen = []
    hooks = record_experts(pipeline, seen)
    pipeline(**CALL, guidance_scale=4.0)
    expected = [name for name, _ in seen[::2]]  # the pipeline calls the expert twice per step (CFG)
    assert set(expected) == set(EXPERTS)  # the tiny schedule (shift 7, 4 steps) crosses the boundary
    seen.clear()
    trainer.generate(["a cat", "a dog"], seed=0)
    assert [name for name, _ in seen] == expected  # one batched forward (both CFG branches) per step
    for hook in hooks:
        hook.remove()


def test_loss_batches_mix_experts_and_keep_ratio_one(tiny_pipeline_path, tmp_path):
    # the loss re-scores random steps per sample: a batch holds rows of both experts, each sent to its own
    trainer = make_video_trainer(
        "tiny-wan22",
        tiny_pipeline_path,
        tmp_path,
        max_steps=1,
        rollout_batch_size=4,
        learning_rate=1.0,
        timestep_fraction=1.0,  # the first T - 1 = 3 steps: 2 high-noise, 1 low-noise
    )
    assert trainer.adapter.expert_of_step.tolist() == [0, 0, 1, 1]
    seen = []
    record_experts(trainer.pipeline, seen)
    trainer.train()
    assert_first_step_on_policy(trainer)
    rollout = 4 * 2  # 4 steps x 2 slices, 2 x 4 rows each (CFG)
    assert all(rows == 8 for _, rows in seen[:rollout])
    loss = seen[rollout:]
    assert sum(rows for _, rows in loss) == 3 * 2 * 8  # 3 trained steps x 2 slices x 8 rows, split between experts
    assert any(rows < 8 for _, rows in loss)  # a batch was split between the experts


def test_lora_round_trip_through_diffusers_two_expert_loader(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-wan22")
    trainer = make_video_trainer(
        "tiny-wan22", tiny_pipeline_path, tmp_path, peft_config=lora_config(), learning_rate=1e-2
    )
    trainer.train()
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert files == LORA_FILES

    def run(pipeline):
        return pipeline(**CALL, generator=torch.Generator().manual_seed(0)).frames

    trained = run(trainer.pipeline)
    base = DiffusionPipeline.from_pretrained(path)
    untouched = run(base)
    base.load_lora_weights(str(folder))
    high_only = run(base)
    base.load_lora_weights(
        str(folder), weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True
    )
    loaded = run(base)
    assert (high_only - untouched).abs().max() > 1e-3 and (loaded - high_only).abs().max() > 1e-3  # both matter
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ema_of_both_experts_saves_and_loads_as_the_card_says(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-wan22")
    trainer = make_video_trainer(
        "tiny-wan22",
        tiny_pipeline_path,
        tmp_path,
        peft_config=lora_config(),
        learning_rate=1e-2,
        timestep_fraction=1.0,  # both experts trained
        ema_decay=0.5,
    )
    trainer.train()
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    assert sorted(f for f in os.listdir(folder / "ema") if f.endswith(".safetensors")) == LORA_FILES
    card = (folder / "README.md").read_text()
    for name in LORA_FILES:  # every file named, the main ones too (a Hub repo would list ema/ first)
        assert f'weight_name="ema/{name}"' in card and f'weight_name="{name}"' in card

    def run(pipeline):
        return pipeline(**CALL, generator=torch.Generator().manual_seed(0)).frames

    with trainer.ema.applied():
        expected = run(trainer.pipeline)
    trained = run(trainer.pipeline)
    base = DiffusionPipeline.from_pretrained(path)
    base.load_lora_weights(str(folder), weight_name=f"ema/{LORA_FILES[0]}")
    base.load_lora_weights(str(folder), weight_name=f"ema/{LORA_FILES[1]}", load_into_transformer_2=True)
    loaded = run(base)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert (loaded - trained).abs().max() > 1e-4  # the EMA is not the trained weights


def test_only_the_trained_expert_is_saved(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(
        "tiny-wan22", tiny_pipeline_path, tmp_path, peft_config=lora_config(), train_experts=["transformer_2"]
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    files = sorted(f for f in os.listdir(tmp_path / "lora") if f.endswith(".safetensors"))
    assert files == ["pytorch_lora_weights_transformer_2.safetensors"]
    assert trainer.adapter.lora_load_arguments() == [
        ', weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True'
    ]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_continues_exactly(use_lora, tiny_pipeline_path, tmp_path):
    settings = dict(max_steps=4, learning_rate=1e-2, save_steps=2, save_strategy="steps", timestep_fraction=1.0)

    def trainer(out):
        peft = lora_config() if use_lora else None
        return make_video_trainer("tiny-wan22", tiny_pipeline_path, out, peft_config=peft, **settings)

    straight = trainer(tmp_path / "straight")
    straight.train()
    first = trainer(tmp_path / "resumed")
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    saved = {"transformer", "transformer_2"} if not use_lora else set(LORA_FILES)  # both experts, in diffusers' layout
    assert saved <= set(os.listdir(checkpoint))
    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    assert torch.equal(params(second), params(straight))


def test_ti2v_5b_per_token_timesteps(tiny_pipeline_path, tmp_path):
    trainer = make_video_trainer(
        "tiny-wan22-ti2v", tiny_pipeline_path, tmp_path, peft_config=lora_config(), max_steps=1
    )
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"].shape), with_kwargs=True
    )
    before = snapshot_parameters(trainer)
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert_first_step_on_policy(trainer)
    # one timestep per latent token, as WanPipeline with expand_timesteps: 2 latent frames x (2 x 2) / (2 x 2) patches
    assert trainer.adapter.latent_shape == (48, 2, 2, 2)
    assert set(seen) == {torch.Size([16, 2])}  # CFG: 2 x 8 rows
    trained = trainer.pipeline(**CALL, generator=torch.Generator().manual_seed(0)).frames
    folder = tmp_path / "lora"
    trainer.save_model(str(folder))
    base = DiffusionPipeline.from_pretrained(tiny_pipeline_path("tiny-wan22-ti2v"))
    base.load_lora_weights(str(folder))
    torch.testing.assert_close(base(**CALL, generator=torch.Generator().manual_seed(0)).frames, trained)


def test_clear_errors(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="train_experts"):
        DanceGRPOConfig(output_dir=str(tmp_path), train_experts=["transformer_3"])
    with pytest.raises(ValueError, match="one denoiser: leave train_experts unset"):
        make_video_trainer("tiny-wan", tiny_pipeline_path, tmp_path, train_experts=["transformer"])
    pipeline = DiffusionPipeline.from_pretrained(tiny_pipeline_path("tiny-wan22"))
    pipeline.register_to_config(boundary_ratio=None)
    with pytest.raises(ValueError, match="no `boundary_ratio`"):
        make_video_trainer("tiny-wan22", lambda name: pipeline, tmp_path)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_model_card_loads_both_experts(use_lora, tiny_pipeline_path, tmp_path):
    from huggingface_hub import ModelCard

    trainer = make_video_trainer(
        "tiny-wan22",
        tiny_pipeline_path,
        tmp_path,
        peft_config=lora_config() if use_lora else None,
        max_steps=1,
        hub_model_id="user/wan22-dancegrpo",
    )
    trainer.train()
    trainer.create_model_card()
    card = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md")).text
    if use_lora:
        assert 'pipe.load_lora_weights("user/wan22-dancegrpo")\n' in card
        assert (
            'pipe.load_lora_weights("user/wan22-dancegrpo", weight_name="pytorch_lora_weights_transformer_2.safetensors"'
            ", load_into_transformer_2=True)\n" in card
        )
    else:
        for name in EXPERTS:
            assert f'{name} = WanTransformer3DModel.from_pretrained("user/wan22-dancegrpo", subfolder="{name}"' in card
        assert "transformer=transformer, transformer_2=transformer_2, torch_dtype" in card
    assert "guidance_scale=4," in card


def test_sde_window_and_clean_last_step(tiny_pipeline_path, tmp_path):
    # a window of 2 SDE steps of 4 (ODE elsewhere, the last step clean); the trained steps lie in the window, both
    # experts' steps can be in it, and the loss re-scores them on policy
    trainer = make_video_trainer(
        "tiny-wan22", tiny_pipeline_path, tmp_path, max_steps=1, sde_window_size=2, learning_rate=1.0
    )
    rows = [{"prompt": p} for p in ["a cat"] * 4 + ["a dog"] * 4]
    batch = trainer._generate_and_score(rows)
    window = trainer.sampler.window(trainer.args.seed, 0)
    stochastic = (batch["log_probs"] != 0).all(dim=0).tolist()
    assert stochastic == [i in window for i in range(4)] and not stochastic[-1]
    assert set(batch["train_steps"].flatten().tolist()) <= set(window)
    trainer.train()
    assert_first_step_on_policy(trainer)


def test_two_experts_refuse_fsdp(tiny_pipeline_path, tmp_path, monkeypatch):
    from trl_dancegrpo import DanceGRPOTrainer

    create = DanceGRPOTrainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):  # what `accelerate launch --use_fsdp` makes the Trainer see
        create(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(DanceGRPOTrainer, "create_accelerator_and_postprocess", as_if_fsdp)
    with pytest.raises(ValueError, match="two experts, which train under DDP"):
        make_video_trainer("tiny-wan22", tiny_pipeline_path, tmp_path)
    make_video_trainer("tiny-wan22-ti2v", tiny_pipeline_path, tmp_path)  # one transformer: FSDP is fine
