"""Bad input gets a clear error early, or (a NaN score of one sample) is skipped and counted; never silent garbage."""

import math

import pytest
from datasets import Dataset

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.rewards import brightness

from .test_trainer import make_config, make_trainer


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_generations": 1}, "num_generations must be at least 2"),
        ({"timestep_fraction": 0.0}, r"timestep_fraction must be in \(0, 1\]"),
        ({"timestep_fraction": 1.5}, r"timestep_fraction must be in \(0, 1\]"),
        ({"eta": 0.0}, "eta must be > 0"),
        ({"per_device_train_batch_size": 6}, "must be a multiple of num_generations"),
        ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation must be one of"),
        ({"height": 30}, "height must be a positive multiple of 16"),
        ({"rollout_batch_size": 0}, "rollout_batch_size must be a positive integer"),
    ],
)
def test_config_rejects_contradictory_settings(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_defaults_are_the_recipe():
    args = DanceGRPOConfig(output_dir="unused")
    assert (args.num_generations, args.num_inference_steps, args.eta, args.timestep_fraction) == (12, 16, None, 0.6)
    assert (args.sde_type, args.sde_window_size) == ("dancegrpo", None)
    assert (args.epsilon, args.adv_clip_max, args.beta, args.init_same_noise) == (1e-4, 5.0, 0.0, True)
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type) == (1e-5, 1e-4, "constant")
    assert args.steps_per_generation == args.gradient_accumulation_steps  # one rollout, one optimizer step


def test_empty_dataset(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, dataset=Dataset.from_dict({"prompt": []}))


def test_no_prompt_column(tiny_pipeline_path, tmp_path):
    dataset = Dataset.from_dict({"caption": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match="no 'prompt' column.*rename_column"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, dataset=dataset)


def test_too_few_prompts_for_one_rollout(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="uses 2 distinct prompts"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, dataset=Dataset.from_dict({"prompt": ["a"]}))


def test_unsupported_pipeline(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
    )
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="DDPMPipeline is not supported.*FluxPipeline, StableDiffusionPipeline"):
        make_trainer(pipeline, tmp_path)


def test_reward_weights_length(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="reward_weights has 2 entries but there are 1 reward"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward_weights=[1.0, 2.0])


def test_unknown_reward_name(tiny_pipeline_path, tmp_path):
    with pytest.raises(ValueError, match="Unknown reward 'nope'. Known rewards: .*brightness"):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward="nope")


def _train_with(reward, tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward=reward, max_steps=1)
    trainer.train()
    return trainer


def test_reward_of_wrong_length(tiny_pipeline_path, tmp_path):
    def short(prompts, images, **kwargs):
        return [0.0] * (len(prompts) - 1)

    with pytest.raises(ValueError, match="'short' returned 7 values for 8 samples"):
        _train_with(short, tiny_pipeline_path, tmp_path)


def test_infinite_reward(tiny_pipeline_path, tmp_path):
    def infinite(prompts, images, **kwargs):
        return [math.inf] + [0.0] * (len(prompts) - 1)

    with pytest.raises(ValueError, match="'infinite' returned inf for sample 0.*must be finite"):
        _train_with(infinite, tiny_pipeline_path, tmp_path)


def test_reward_that_raises(tiny_pipeline_path, tmp_path):
    def broken(prompts, images, **kwargs):
        raise KeyError("model not loaded")

    with pytest.raises(RuntimeError, match="'broken' raised KeyError"):
        _train_with(broken, tiny_pipeline_path, tmp_path)


def test_non_numeric_reward(tiny_pipeline_path, tmp_path):
    def text(prompts, images, **kwargs):
        return ["good"] * len(prompts)

    with pytest.raises(TypeError, match="'text' returned 'good' for sample 0; expected a number or None"):
        _train_with(text, tiny_pipeline_path, tmp_path)


def test_a_nan_reward_skips_that_sample_and_is_counted(tiny_pipeline_path, tmp_path):
    seen = {}

    def flaky(prompts, images, **kwargs):
        values = brightness(prompts, images)
        values[1] = math.nan
        return values

    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward=flaky, max_steps=1)
    generate_and_score = trainer._generate_and_score
    trainer._generate_and_score = lambda inputs: seen.setdefault("batch", generate_and_score(inputs))
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["num_failed_samples"] == 1
    assert math.isfinite(logs["rewards/flaky/mean"]) and math.isfinite(logs["loss"])
    advantages = seen["batch"]["advantages"]
    assert advantages[1] == 0 and advantages[[0, 2, 3]].abs().sum() > 0  # the rest of its group still learns


def test_all_nan_rewards_are_an_error_not_silent(tiny_pipeline_path, tmp_path):
    def all_nan(prompts, images, **kwargs):
        return [math.nan] * len(prompts)

    with pytest.raises(ValueError, match="every sample"):
        _train_with(all_nan, tiny_pipeline_path, tmp_path)


def test_model_of_wrong_type(tmp_path):
    with pytest.raises(TypeError, match="model must be a diffusers pipeline or a Hub id"):
        DanceGRPOTrainer(model=42, reward_funcs=brightness, args=make_config(tmp_path))


def test_a_denoiser_that_already_has_a_lora_is_a_clear_error(tmp_path):
    from peft import LoraConfig

    from trl_dancegrpo.tiny import tiny_flux_pipeline

    pipeline = tiny_flux_pipeline()
    make_trainer(pipeline, tmp_path, peft_config=LoraConfig(r=2, lora_alpha=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        make_trainer(pipeline, tmp_path, peft_config=LoraConfig(r=2, lora_alpha=2))
