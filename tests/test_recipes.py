"""Every recipe and accelerate config under examples/ parses and validates (without loading the real model)."""

import glob
import os
import subprocess
import sys

import pytest
import yaml

from trl_dancegrpo.cli import make_parser
from trl_dancegrpo.rewards import get_reward


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
RECIPES = sorted(glob.glob(os.path.join(EXAMPLES, "recipes", "*.yaml")))


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_recipe_parses_and_validates(recipe):
    # use_cpu: the recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless told so
    argv = ["--config", recipe, "--use_cpu", "true"]
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    assert model_args.model_name_or_path
    for name in script_args.reward_funcs:
        assert callable(get_reward(name))  # model rewards load lazily: no download here
    assert training_args.generation_batch_size % training_args.num_generations == 0
    with open(recipe) as handle:
        raw = yaml.safe_load(handle)
    for key, value in raw.items():  # nothing in the file was silently ignored
        parsed = [getattr(obj, key) for obj in (script_args, training_args, model_args) if hasattr(obj, key)]
        assert parsed, f"{key} is not an option"
        if key not in ("lr_scheduler_type", "report_to"):  # normalised by TrainingArguments
            assert parsed[0] == value, key


def test_recipes_exist():
    expected = {"flux_lora.yaml", "flux_full.yaml", "sd14.yaml", "hunyuan_video.yaml", "skyreels_i2v.yaml"}
    expected |= {"wan22_t2v.yaml", "z_image.yaml", "flux2_klein.yaml", "flux2_dev.yaml", "wan21_v2v.yaml"}
    expected |= {"qwen_image21.yaml", "hunyuan_video15_t2v.yaml", "hunyuan_video15_i2v.yaml"}
    expected |= {"ltx2.yaml", "ltx2_condition.yaml"}
    expected |= {"qwen_image.yaml", "qwen_image_edit.yaml", "flux_kontext.yaml"}
    assert expected <= {os.path.basename(r) for r in RECIPES}


@pytest.mark.parametrize(
    "config", sorted(glob.glob(os.path.join(EXAMPLES, "accelerate", "*.yaml"))), ids=os.path.basename
)
def test_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(config)
    assert loaded.num_processes >= 1 and loaded.mixed_precision == "bf16"


@pytest.mark.slow
def test_ten_line_example_runs_on_a_tiny_model(tiny_pipeline_path, tmp_path):
    script = os.path.join(EXAMPLES, "train_flux_lora.py")
    with open(script) as handle:
        code_lines = [line for line in handle if line.strip() and not line.startswith("#")]
    assert len(code_lines) <= 12
    # the real script with the tiny model, tiny sizes and local rewards patched in through a sitecustomize-free wrapper
    wrapper = tmp_path / "run.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "import trl_dancegrpo\n"
        "from trl_dancegrpo import DanceGRPOConfig\n"
        "class Tiny(DanceGRPOConfig):\n"
        "    def __init__(self, **kw):\n"
        "        kw.update(height=32, width=32, num_generations=3, per_device_train_batch_size=3, num_inference_steps=2,\n"
        "                  max_steps=1, report_to='none')\n"
        "        super().__init__(**kw)\n"
        "trl_dancegrpo.DanceGRPOConfig = Tiny\n"
        "from trl_dancegrpo.rewards import REWARD_REGISTRY, brightness\n"
        "for name in ('hpsv2.1', 'clip_score'):\n"
        "    REWARD_REGISTRY[name] = lambda **kw: brightness\n"
        "sys.argv = sys.argv[:2]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, str(wrapper), tiny_pipeline_path("tiny-flux")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "flux-dancegrpo" / "pytorch_lora_weights.safetensors").exists()
