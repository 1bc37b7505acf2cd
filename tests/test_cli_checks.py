"""The command line refuses bad input at once (before torch is imported) and says what to do; `--help` reads well."""

import os
import re
import subprocess
import sys

import pytest
import yaml


def run_cli(*argv, env=None, timeout=300):
    """`python -m trl_dancegrpo ARGV` in a fresh interpreter: its result and which of torch, transformers and diffusers
    it had imported when it stopped (the fast checks must import none of them: they report in a fraction of a second
    where those imports take 10 s)."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'diffusers') "
        "if m in sys.modules), file=sys.stderr))\n"
        "from trl_dancegrpo.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    lines = result.stderr.splitlines()
    imported = eval(lines[-1].removeprefix("IMPORTED ")) if lines and lines[-1].startswith("IMPORTED") else None
    result.stderr = "\n".join(line for line in lines if not line.startswith("IMPORTED"))
    return result, imported


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1e-4"], "unrecognized argument '--learning_rat'. Did you mean learning_rate?"),
        (["--num_generation", "4"], "Did you mean num_generations"),
        (["--learning_rate", "fast"], "invalid float value: 'fast'"),
        (["--num_generations", "1"], "num_generations must be at least 2"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
        (["--reward_weights", "inf"], "reward_weights[0] is inf"),
        (["--reward_weights", "nan"], "reward_weights[0] is nan"),
        (["--reward_timeout", "0"], "reward_timeout must be a number of seconds > 0"),
        (["--reward_kwargs", "{hpsv2.1: 1}"], "reward_kwargs must be a JSON object"),
        (["--dataset_name", "prompts.txt"], "--dataset_name prompts.txt: file not found"),
        (["--dataset_name", "./data/prompts"], "file not found"),
        (["--use_peft", "maybe"], "Truthy value expected"),
        (["--ema_decay", "1.5"], "ema_decay must be in (0, 1)"),
        (["--eval_with_ema", "true"], "eval_with_ema set without ema_decay"),
    ],
)
def test_wrong_options_and_values_fail_fast(argv, message, tmp_path):
    result, imported = run_cli("--output_dir", str(tmp_path), *argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert imported == []


def test_the_checks_import_neither_torch_nor_transformers(tmp_path):
    code = (
        "import sys\n"
        "from trl_dancegrpo.cli import run\n"
        "try:\n"
        f"    run(argv=['--output_dir', {str(tmp_path)!r}, '--num_generations', '1'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_recipe_keys_and_values_are_checked_fast(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "tiny-flux", "learning_rat": 1e-4}))
    result, imported = run_cli("--config", str(recipe), "--output_dir", str(tmp_path))
    assert result.returncode == 2 and "Unknown option 'learning_rat' in the recipe" in result.stderr
    assert "Did you mean learning_rate" in result.stderr and imported == []
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "tiny-flux", "num_generations": 1}))
    result, imported = run_cli("--config", str(recipe), "--output_dir", str(tmp_path))
    assert result.returncode == 2 and "num_generations must be at least 2" in result.stderr and imported == []


def test_the_full_parser_refuses_abbreviations():
    from trl_dancegrpo.cli import make_parser

    parser = make_parser()
    assert parser.allow_abbrev is False
    with pytest.raises((SystemExit, ValueError), match="learning_rat"):
        parser.parse_args_and_config(["--learning_rat", "1e-4", "--output_dir", "x"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--help"], "model and LoRA:"),
        (
            ["--reward_funcs", "brightness", "--reward_weights", "1", "2"],
            "reward_weights has 2 entries but there are 1",
        ),
        (["--reward_funcs", "HPSv3"], "Unknown reward 'HPSv3'. Did you mean 'hpsv3'"),
        (["--reward_funcs", "HPSv2.1"], "Unknown reward 'HPSv2.1'. Did you mean 'hpsv2.1'"),
        (["estimate-memroy"], "unknown command 'estimate-memroy'. Did you mean estimate-memory?"),
    ],
)
def test_help_and_reward_checks_import_nothing_heavy(argv, message, tmp_path):
    result, imported = run_cli(*argv, "--output_dir", str(tmp_path))
    assert imported == [], result.stderr
    assert message in result.stdout + result.stderr


def test_help_lists_dancegrpo_groups_first():
    result, _ = run_cli("--help")
    assert result.returncode == 0
    text = result.stdout
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headings[:2] == ["options", "model and LoRA"]
    assert headings[2] == "data"
    assert headings[-1] == "inherited transformers.TrainingArguments options"
    order = [headings.index(h) for h in ("sampling (the rollout)", "the rewards", "the loss", "saving and logging")]
    assert order == sorted(order) and order[-1] < len(headings) - 1
    # our options come before the inherited ones
    assert text.index("--num_generations") < text.index("--learning_rate") < text.index("--adam_beta1")
    assert text.index("--reward_funcs") < text.index("--reward_weights") < text.index("--adam_beta1")
    assert "_samples/" in text  # where the logged samples go (--log_samples)
    assert "estimate-memory" in text  # the subcommands are named


@pytest.mark.slow  # builds the full parser (imports torch)
def test_help_lists_every_option_of_the_full_parser():
    from trl_dancegrpo.cli import make_parser

    full = {option for action in make_parser()._actions for option in action.option_strings}
    result, _ = run_cli("--help")
    shown = set(re.findall(r"(--?[\w-]+)", result.stdout))
    assert full - {"--config"} <= shown, sorted(full - shown)


@pytest.mark.slow  # a full command-line start (imports torch)
def test_reward_names_are_checked_before_the_model_loads(tmp_path):
    # the model does not exist: had it been loaded first, the error would be about the model
    missing_model = str(tmp_path / "no-such-model")
    result, _ = run_cli(
        "--model_name_or_path", missing_model, "--reward_funcs", "hpsv2.2", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 2
    assert "Unknown reward 'hpsv2.2'. Did you mean 'hpsv2.1' or 'hpsv2'" in result.stderr
    assert "No module named" not in result.stderr
    result, _ = run_cli(
        "--model_name_or_path", missing_model, "--reward_funcs", "brightnes", "--output_dir", str(tmp_path)
    )
    assert "Unknown reward 'brightnes'. Did you mean 'brightness'?" in result.stderr


@pytest.mark.slow  # a full command-line start (imports torch)
def test_a_reward_checkpoint_missing_offline_names_reward_kwargs(tmp_path):
    missing_model = str(tmp_path / "no-such-model")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result, _ = run_cli(
        "--model_name_or_path", missing_model, "--reward_funcs", "hpsv2.1", "--output_dir", str(tmp_path), env=env
    )
    assert result.returncode == 2
    stderr = result.stderr
    assert "HPS_v2.1_compressed.pt" in stderr and "no-such-model" not in stderr
    assert """--reward_kwargs '{"hpsv2.1": {"checkpoint_path": "/path/to/file"}}'""" in stderr
    assert "in a YAML recipe `reward_kwargs:" in stderr
    # the local path given that way is used (here: it does not exist, and the error says so)
    result, _ = run_cli(
        "--model_name_or_path",
        missing_model,
        "--reward_funcs",
        "hpsv2.1",
        "brightness",
        "--reward_kwargs",
        '{"hpsv2.1": {"checkpoint_path": "/nowhere/HPS.pt"}}',
        "--output_dir",
        str(tmp_path),
        env=env,
    )
    assert "`checkpoint_path` points to '/nowhere/HPS.pt', which is not a file" in result.stderr


def test_reward_kwargs_for_a_reward_that_is_not_used(tmp_path):
    from trl_dancegrpo.rewards.scoring import resolve_reward_funcs

    with pytest.raises(ValueError, match="reward_kwargs has an entry for 'hpsv2.1', which is not one of the rewards"):
        resolve_reward_funcs(["brightness"], {"hpsv2.1": {"checkpoint_path": "x.pt"}})
    with pytest.raises(ValueError, match="The reward 'brightness' takes no arguments, got \\['scale'\\]"):
        resolve_reward_funcs(["brightness"], {"brightness": {"scale": 2}})


@pytest.mark.slow  # a full command-line start (imports torch)
def test_a_hub_model_missing_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result, _ = run_cli("--model_name_or_path", "some-org/some-pipeline", "--output_dir", str(tmp_path), env=env)
    assert result.returncode == 2
    assert "Could not load the pipeline 'some-org/some-pipeline'" in result.stderr
    assert "hf download some-org/some-pipeline" in result.stderr
    assert "stacktrace above" not in result.stderr and "torch_dtype" not in result.stderr


@pytest.mark.parametrize("command", [[], ["estimate-memory"]])
def test_a_malformed_recipe_is_one_line_naming_the_file_and_line(command, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: tiny-flux\nlearning_rate: 1e-4\n  num_generations: 4\n")
    result, _ = run_cli(*command, "--config", str(recipe), "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert (
        f"--config {recipe}, line 3, column 18: not valid YAML (mapping values are not allowed here)" in result.stderr
    )


def test_estimate_memory_checks_options_fast_but_reads_no_prompt_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"  # its prompt file lives on the training machine, not here
    recipe.write_text("model_name_or_path: tiny-flux\ndataset_name: prompts.txt\n")
    result, imported = run_cli("estimate-memory", "--config", str(recipe), "--learning_rat", "1e-4")
    assert result.returncode == 2 and imported == []
    assert "unrecognized argument '--learning_rat'" in result.stderr and "prompts.txt" not in result.stderr
