"""The command line: the built-in offline demo, prompt files, and clear failures."""

import json
import os
import subprocess
import sys

import pytest
import torch

from trl_dancegrpo.cli import run
from trl_dancegrpo.tiny import tiny_flux_pipeline


def test_demo_writes_lora_metrics_and_plot(tmp_path):
    out = tmp_path / "demo"
    trainer = run(argv=["--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true"])
    assert trainer.is_lora and trainer.adapter.height == 32
    files = {p.name for p in out.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "metrics.json", "reward_curve.png", "README.md"} <= files
    history = json.loads((out / "metrics.json").read_text())
    assert sum("rewards/brightness/mean" in log for log in history) == 2
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pipeline = tiny_flux_pipeline()
    pipeline.load_lora_weights(str(out))
    lora_keys = [n for n, _ in pipeline.transformer.named_parameters() if "lora" in n]
    assert lora_keys
    run_card_snippet(out, tmp_path)


def run_card_snippet(out, tmp_path):
    """The model card's loading snippet runs exactly as printed (the tiny pipeline rebuilt, the weights loaded)."""
    card = (out / "README.md").read_text()
    snippet = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "<" not in snippet, snippet  # no placeholder such as <base model id or path>
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "<model card>", "exec"), {"__name__": "__card__"})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "sample.png").is_file()


def test_prompt_file_and_tiny_sd(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na car\na tree\n")
    argv = [
        "--model_name_or_path",
        "tiny-sd",
        "--dataset_name",
        str(prompts),
        "--output_dir",
        str(tmp_path / "o"),
        "--num_generations",
        "2",
        "--num_inference_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--height",
        "32",
        "--width",
        "32",
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    trainer = run(argv=argv)
    assert len(trainer.train_dataset) == 4 and not trainer.is_lora
    assert (tmp_path / "o" / "config.json").exists()  # the full UNet
    run_card_snippet(tmp_path / "o", tmp_path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_such_option", "1"], "no_such_option"),
        (["--num_generations", "1"], "num_generations must be at least 2"),
    ],
)
def test_bad_command_lines_fail_with_a_clear_message(argv, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trl_dancegrpo", "--output_dir", str(tmp_path), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_gradient_checkpointing_reaches_the_denoiser(tmp_path):
    trainer = run(
        argv=[
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "1",
            "--gradient_checkpointing",
            "true",
            "--disable_tqdm",
            "true",
        ]
    )
    assert trainer.model.gradient_checkpointing
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_last_line_names_the_ema_folder_when_there_is_one(tmp_path):
    from trl_dancegrpo import DanceGRPOConfig
    from trl_dancegrpo.cli import saved_message

    plain = DanceGRPOConfig(output_dir=str(tmp_path))
    with_ema = DanceGRPOConfig(output_dir=str(tmp_path), ema_decay=0.99)
    assert "ema/" not in saved_message(plain, lora=True)
    assert "Saved the LoRA, the EMA of the LoRA (ema/)," in saved_message(with_ema, lora=True)
    assert "Saved the denoiser, the EMA of the denoiser (ema/)," in saved_message(with_ema, lora=False)
