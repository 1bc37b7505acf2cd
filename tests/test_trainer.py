"""DanceGRPOTrainer end to end on tiny SD and FLUX pipelines loaded from disk."""

import math

import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from peft import LoraConfig

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.rewards import brightness


PIPELINES = ["tiny-flux", "tiny-sd"]
IMAGE_CALL = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")


def make_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        num_generations=4,
        num_inference_steps=4,
        per_device_train_batch_size=8,
        max_steps=2,
        height=32,
        width=32,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    values.update(overrides)
    return DanceGRPOConfig(**values)


def make_trainer(path, tmp_path, reward=brightness, dataset=None, peft_config=None, **overrides):
    dataset = dataset if dataset is not None else Dataset.from_dict({"prompt": ["a cat", "a dog", "a car", "a tree"]})
    return DanceGRPOTrainer(
        model=path,
        reward_funcs=reward,
        args=make_config(tmp_path, **overrides),
        train_dataset=dataset,
        peft_config=peft_config,
    )


def snapshot_parameters(trainer) -> dict:
    """Copies of the denoiser's trainable and frozen parameters and of the pipeline's other (frozen) modules."""
    named = list(trainer.model.named_parameters())
    return {
        "trainable": {n: p.detach().clone() for n, p in named if p.requires_grad},
        "frozen": {n: p.detach().clone() for n, p in named if not p.requires_grad},
        "others": {
            f"{c}.{n}": p.detach().clone()
            for c, module in trainer.adapter.frozen_modules().items()
            for n, p in module.named_parameters()
        },
    }


def assert_only_trainable_parameters_changed(trainer, before: dict) -> None:
    """Every trainable parameter moved; nothing frozen (in the denoiser or elsewhere in the pipeline) did."""
    for n, p in trainer.model.named_parameters():
        if n in before["trainable"]:
            assert not torch.equal(p, before["trainable"][n]), f"trainable parameter {n} did not change"
        else:
            assert torch.equal(p, before["frozen"][n]), f"frozen parameter {n} changed"
    for c, module in trainer.adapter.frozen_modules().items():
        for n, p in module.named_parameters():
            assert torch.equal(p, before["others"][f"{c}.{n}"]), f"{c}.{n} changed"


def assert_first_step_on_policy(trainer) -> None:
    """The first logged step re-scored its rollout exactly: every ratio 1, nothing clipped."""
    logs = trainer.state.log_history[0]
    assert abs(logs["ratio/min"] - 1) < 1e-6 and abs(logs["ratio/max"] - 1) < 1e-6
    assert logs["clip_ratio"] == 0


def assert_trains_what_it_should(trainer, use_lora: bool) -> None:
    """Train: every parameter that should learn does (LoRA: the adapter's only; full: the whole denoiser), nothing
    else moves, the first step is on-policy and every logged loss is finite."""
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    assert all("lora" in n for n in before["trainable"]) if use_lora else not before["frozen"]
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    assert_first_step_on_policy(trainer)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(loss) for loss in losses)


def assert_lora_round_trip(trainer, path, folder, call: dict, output: str = "images") -> torch.Tensor:
    """The saved LoRA, loaded into a fresh pipeline with `load_lora_weights`, reproduces the trained outputs."""
    trainer.save_model(str(folder))
    trained = getattr(trainer.pipeline(**call, generator=torch.Generator().manual_seed(0)), output)
    base = DiffusionPipeline.from_pretrained(path)
    untouched = getattr(base(**call, generator=torch.Generator().manual_seed(0)), output)
    base.load_lora_weights(str(folder))
    loaded = getattr(base(**call, generator=torch.Generator().manual_seed(0)), output)
    assert (trained - untouched).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    return trained


def lora_config():
    # Gaussian init: with the default zero-initialised B the first step could not move A
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian")


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train(name, use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path(name), tmp_path, peft_config=lora_config() if use_lora else None)
    before = snapshot_parameters(trainer)
    assert before["trainable"] and before["others"]
    assert all("lora" in n for n in before["trainable"]) if use_lora else not before["frozen"]
    trainer.train()
    assert_only_trainable_parameters_changed(trainer, before)
    logs = trainer.state.log_history[0]
    for key in (
        "rewards/brightness/mean",
        "rewards/brightness/std",
        "advantages/std",
        "clip_ratio",
        "ratio/mean",
        "approx_kl",
        "grad_norm",
        "timing/rollout",
        "timing/train",
        "loss",
    ):
        assert key in logs and math.isfinite(logs[key]), key


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("batch, rollout_batch_size", [(8, 2), (12, None)])
def test_ratio_is_one_at_the_first_inner_step(name, batch, rollout_batch_size, tiny_pipeline_path, tmp_path):
    # slices smaller than the batch, a batch larger than the eval batch (8), CFG on for SD: the loss must re-score
    # with the rollout's batch composition
    trainer = make_trainer(
        tiny_pipeline_path(name),
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=batch,
        rollout_batch_size=rollout_batch_size,
        learning_rate=1.0,
    )
    assert trainer.adapter.use_cfg == (name == "tiny-sd")
    trainer.train()
    assert_first_step_on_policy(trainer)


def test_ratio_moves_when_a_rollout_is_reused(tiny_pipeline_path, tmp_path):
    # a rollout split over 2 optimizer steps: the second step re-scores under updated weights, ratios leave 1
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, max_steps=2, steps_per_generation=2, per_device_train_batch_size=4
    )
    trainer.train()
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    assert abs(first["ratio/max"] - 1) < 1e-6
    assert abs(second["ratio/max"] - 1) > 1e-6 or abs(second["ratio/min"] - 1) > 1e-6


@pytest.mark.slow
def test_rollout_batch_size_does_not_change_results(tiny_pipeline_path, tmp_path):
    # SGD, not Adam: Adam's first steps are ~lr * sign(grad), which turns float round-off of near-zero gradients
    # (batches of 3 vs 8 rows take different matmul paths) into full-size parameter differences
    results = []
    for size in (None, 3):
        trainer = make_trainer(
            tiny_pipeline_path("tiny-flux"),
            tmp_path / str(size),
            rollout_batch_size=size,
            optim="sgd",
            learning_rate=1e-1,
        )
        trainer.train()
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append((params, [log["rewards/brightness/mean"] for log in trainer.state.log_history[:-1]]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)


def test_groups_share_initial_noise_but_not_sde_noise(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path)
    prompts = ["a cat"] * 4 + ["a dog"] * 4
    _, traj = trainer.generate(prompts, seed=0, eta=0.3, group_size=4)
    start, end = traj.latents[:, 0], traj.latents[:, -1]
    assert torch.equal(start[0], start[3]) and torch.equal(start[4], start[7])
    assert not torch.equal(start[0], start[4])
    assert not torch.allclose(end[0], end[1])  # same start, different SDE noise
    # init_same_noise=False: every sample its own start
    _, traj = trainer.generate(prompts, seed=0, eta=0.3, group_size=1)
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def test_prompts_are_encoded_once_per_prompt(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path, max_steps=1)
    calls = []
    encode = trainer.adapter.encode_prompts
    trainer.adapter.encode_prompts = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    trainer.train()
    # 8 samples = 2 prompts x 4 generations: one call with the 2 distinct prompts (+ the empty prompt once, for CFG)
    assert sorted(len(c) for c in calls) == [1, 2] and [""] in calls


def test_cfg_runs_both_branches_in_one_batched_forward(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path, max_steps=1, rollout_batch_size=4)
    batch_sizes = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(args[0].shape[0]), with_kwargs=True
    )
    trainer.train()
    # rollout: 4 steps x 2 slices; loss: int(0.6 * (4 - 1)) = 1 step x 2 slices; each forward holds 2 x 4 rows
    assert batch_sizes == [8] * (4 * 2 + 1 * 2)


def test_guidance_defaults_per_family(tiny_pipeline_path, tmp_path):
    flux = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path)
    sd = make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path)
    assert flux.adapter.guidance_scale == 3.5 and flux.adapter.embedded_guidance and not flux.adapter.use_cfg
    assert sd.adapter.guidance_scale == 5.0 and sd.adapter.use_cfg
    assert not make_trainer(tiny_pipeline_path("tiny-sd"), tmp_path, guidance_scale=1.0).adapter.use_cfg


def test_each_sample_trains_on_a_random_subset_of_its_steps(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, num_inference_steps=5, timestep_fraction=0.6)
    batch = trainer._generate_and_score([{"prompt": p} for p in ["a cat"] * 4 + ["a dog"] * 4])
    steps = batch["train_steps"]
    assert steps.shape == (8, 2)  # int(0.6 * (5 - 1)) of the first 4 steps, as DanceGRPO's code
    assert all(len(set(row.tolist())) == 2 for row in steps)
    assert steps.max() <= 3  # the last step (4) is deterministic and never trained
    assert len({tuple(row.tolist()) for row in steps}) > 1


@pytest.mark.parametrize("name", PIPELINES)
def test_lora_round_trip_through_load_lora_weights(name, tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path(name)
    trainer = make_trainer(path, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
    trainer.train()
    assert_lora_round_trip(trainer, path, tmp_path / "lora", IMAGE_CALL)


def test_full_fine_tuning_saves_the_denoiser(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-sd")
    trainer = make_trainer(path, tmp_path, learning_rate=1e-2)
    trainer.train()
    trainer.save_model(str(tmp_path / "unet"))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), unet.named_parameters()):
        assert torch.equal(p.detach(), q), n


def test_evaluate_logs_rewards_of_deterministic_samples(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path)
    trainer.eval_dataset = Dataset.from_dict({"prompt": ["a house", "a bird"]})
    first = trainer.evaluate()
    assert first == trainer.evaluate()  # eta = 0 and a fixed seed: the same samples
    images, _ = trainer.generate(["a house", "a bird"], seed=trainer.args.seed)
    assert first["eval_rewards/brightness/mean"] == pytest.approx(images.mean().item(), abs=1e-6)


def test_async_and_none_rewards(tiny_pipeline_path, tmp_path):
    async def async_brightness(prompts, images, **kwargs):
        return brightness(prompts, images)

    def only_cats(prompts, images, **kwargs):
        return [1.0 if "cat" in p else None for p in prompts]

    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, reward=[async_brightness, only_cats], max_steps=1
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["rewards/async_brightness/mean"])
    assert logs["num_failed_samples"] == 0  # None means "not applicable", not a failure


def test_dataset_columns_reach_the_rewards(tiny_pipeline_path, tmp_path):
    seen = {}

    def reward(prompts, images, target, **kwargs):
        seen["target"] = target
        return [float(t) for t in target]

    dataset = Dataset.from_dict({"prompt": ["a cat", "a dog", "a car", "a tree"], "target": [0, 1, 2, 3]})
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward=reward, dataset=dataset, max_steps=1)
    trainer.train()
    assert len(seen["target"]) == 8 and set(seen["target"]) <= {0, 1, 2, 3}


def test_gradient_accumulation_gives_the_same_update_as_one_big_batch(tiny_pipeline_path, tmp_path):
    # 2 micro-steps of 4 samples (one rollout of 8 feeding one optimizer step) == 1 step of 8 samples
    params = []
    for batch, accumulation in ((8, 1), (4, 2)):
        trainer = make_trainer(
            tiny_pipeline_path("tiny-flux"),
            tmp_path / str(batch),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            rollout_batch_size=4,
            max_steps=1,
            optim="sgd",
            learning_rate=1e-1,
        )
        assert trainer.args.steps_per_generation == accumulation
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_kl_to_the_starting_model(use_lora, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        beta=0.1,
        max_steps=3,
        learning_rate=1e-2,
        peft_config=lora_config() if use_lora else None,
    )
    assert (trainer.ref_denoiser is None) == use_lora  # LoRA: the reference is the adapter disabled, no copy
    trainer.train()
    kls = [log["kl"] for log in trainer.state.log_history if "kl" in log]
    assert len(kls) == 3
    if not use_lora:
        assert kls[0] == 0  # before the first update the model is the reference
    assert kls[-1] > 0


@pytest.mark.slow
def test_overlapping_rewards_with_the_rollout_changes_nothing(tiny_pipeline_path, tmp_path):
    calls, results = [], []
    for overlap in (False, True):

        def reward(prompts, images, overlap=overlap, **kwargs):
            calls.append((overlap, len(prompts)))
            return brightness(prompts, images)

        trainer = make_trainer(
            tiny_pipeline_path("tiny-flux"),
            tmp_path / str(overlap),
            reward=reward,
            rollout_batch_size=2,
            overlap_rewards=overlap,
            optim="sgd",
            learning_rate=1e-1,
        )
        trainer.train()
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append((params, [log["rewards/reward/mean"] for log in trainer.state.log_history[:-1]]))
    assert [n for overlap, n in calls if not overlap] == [8, 8]  # once per batch
    assert [n for overlap, n in calls if overlap] == [2] * 8  # once per slice, while the next slice samples
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-7)
