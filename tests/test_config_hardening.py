"""Bad settings and data found at construction; secrets never printed or saved."""

import json
import logging
import math

import pytest
from datasets import Dataset, DatasetDict

from trl_dancegrpo import DanceGRPOConfig

from .test_trainer import make_config, make_trainer


TOKEN = "hf_secretTOKEN123456789"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reward_weights": [math.inf]}, r"reward_weights\[0\] is inf"),
        ({"reward_weights": [1.0, math.nan]}, r"reward_weights\[1\] is nan"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be at least 1"),
        ({"reward_timeout": -1.0}, "reward_timeout must be a number of seconds > 0"),
        ({"reward_retries": -1}, "reward_retries must be >= 0"),
        ({"reward_kwargs": '{"hpsv2.1": 3}'}, "reward_kwargs must map each reward name"),
        ({"fp16": True}, "fp16=True needs a GPU"),
    ],
)
def test_config_refuses(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_a_zero_reward_weight_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"reward_weights\[1\] is 0"):
        make_config(tmp_path, reward_weights=[1.0, 0.0])


def test_reward_kwargs_from_json_and_from_a_mapping(tmp_path):
    expected = {"hpsv2.1": {"checkpoint_path": "/m/HPS.pt"}}
    assert make_config(tmp_path, reward_kwargs=json.dumps(expected)).reward_kwargs == expected
    assert make_config(tmp_path, reward_kwargs=expected).reward_kwargs == expected


def test_reward_kwargs_reach_the_reward(tiny_pipeline_path, tmp_path, monkeypatch):
    from trl_dancegrpo.rewards import REWARD_REGISTRY, brightness

    received = {}

    def factory(**kwargs):
        received.update(kwargs)
        return brightness

    monkeypatch.setitem(REWARD_REGISTRY, "configurable", factory)
    make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, reward="configurable", reward_kwargs={"configurable": {"x": 1}}
    )
    assert received == {"x": 1}


def test_the_hub_token_is_masked_everywhere(tmp_path, caplog):
    args = make_config(tmp_path, hub_token=TOKEN)
    assert TOKEN not in repr(args) and TOKEN not in str(args) and "<HUB_TOKEN>" in repr(args)
    assert TOKEN not in args.to_json_string() and TOKEN not in json.dumps(args.to_dict())
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("args: %s", args)
        logging.getLogger("test").info("args: %r", args)
    assert TOKEN not in caplog.text and "<HUB_TOKEN>" in caplog.text
    assert args.hub_token == TOKEN  # still usable


def test_the_hub_token_is_not_in_saved_files(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        hub_token=TOKEN,
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        log_samples=False,
    )
    trainer.train()
    trainer.save_model()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_dataset_dict_asks_for_a_split(tiny_pipeline_path, tmp_path):
    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["a", "b", "c", "d"]})})
    with pytest.raises(
        TypeError, match=r"DatasetDict with the splits \['train'\]: pick a split, e.g. dataset\['train'\]"
    ):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, dataset=data)


@pytest.mark.parametrize(
    "prompts, message",
    [
        (["a cat", None, "a car", "a tree"], "Row 1 of train_dataset has no prompt"),
        (["a cat", "a dog", 3, "a tree"], "Row 2 of train_dataset has the prompt 3"),
    ],
)
def test_prompts_that_are_not_strings_are_found_at_construction(prompts, message, tiny_pipeline_path, tmp_path):
    # a mixed column cannot be an Arrow table: a plain list of rows has the same check
    data = Dataset.from_dict({"prompt": prompts}) if None in prompts else ListDataset(prompts)
    with pytest.raises(ValueError, match=message):
        make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, dataset=data)


class ListDataset(list):
    """A map-style dataset of rows (what a user may pass instead of a `datasets.Dataset`)."""

    def __init__(self, prompts):
        super().__init__({"prompt": prompt} for prompt in prompts)
        self.column_names = ["prompt"]


def test_no_pin_memory_warning_on_a_cpu(tmp_path):
    assert make_config(tmp_path).dataloader_pin_memory is False


def test_no_meaningless_float32_warning_and_the_bar_shows_the_reward(tiny_pipeline_path, tmp_path, caplog):
    from diffusers.utils import logging as diffusers_logging
    from transformers import TrainerCallback

    from .test_trainer import lora_config

    class BarPostfix(TrainerCallback):
        def __init__(self):
            self.postfixes = []

        def on_log(self, args, state, control, **kwargs):
            bars = [getattr(c, "training_bar", None) for c in trainer.callback_handler.callbacks]
            self.postfixes += [bar.postfix for bar in bars if bar is not None]

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            trainer = make_trainer(
                tiny_pipeline_path("tiny-flux"), tmp_path, peft_config=lora_config(), max_steps=1, disable_tqdm=False
            )
    finally:
        diffusers_logging.disable_propagation()
    assert "should be kept in float32" not in caplog.text
    recorder = BarPostfix()
    trainer.add_callback(recorder)
    trainer.train()
    reward = trainer.state.log_history[0]["reward"]
    assert recorder.postfixes[0] == f"reward={reward:.4g}"  # at the training step's log (then the summary's)


def test_gradient_checkpointing_sets_checkpointing_without_a_deprecation_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = DanceGRPOConfig(output_dir=str(tmp_path), gradient_checkpointing=True, use_cpu=True, report_to="none")
    assert args.gradient_checkpointing
    if hasattr(args, "activation_checkpointing"):  # transformers releases that renamed it
        assert args.activation_checkpointing
