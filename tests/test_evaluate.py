"""`trl-dancegrpo evaluate` and `evaluate_pipeline`: deterministic samples scored per model, per category, per sample."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from trl_dancegrpo import DanceGRPOConfig, DanceGRPOTrainer
from trl_dancegrpo.evaluation import GRID_HEADER, GRID_PAD, evaluate_pipeline


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = {"prompt": ["a red circle", "two squares", "a blue triangle"], "category": ["colors", "counting", "colors"]}
SAMPLING = dict(num_inference_steps=2, height=32, width=32, per_device_eval_batch_size=4)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, beta=0.0, **SAMPLING)
    values.update(overrides)
    return DanceGRPOConfig(**values)


def train_lora(path, folder, tmp_path) -> str:
    """One LoRA training step on tiny FLUX at a large learning rate, saved as the trainer saves it."""
    trainer = DanceGRPOTrainer(
        model=path,
        reward_funcs="brightness",
        args=config(tmp_path, max_steps=1, learning_rate=0.5, num_generations=2, per_device_train_batch_size=4),
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    )
    trainer.train()
    trainer.save_model(str(folder))
    return str(folder)


def read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_pipeline_base_and_adapter(tiny_pipeline_path, tmp_path):
    from trl_dancegrpo.loading import load_pipeline

    path = tiny_pipeline_path("tiny-flux")
    lora = train_lora(path, tmp_path / "lora", tmp_path)
    pipeline = load_pipeline(path)
    out = tmp_path / "eval"
    args = config(tmp_path, seed=7)
    dataset = Dataset.from_dict({"prompt": ["a red circle", "two squares"], "category": ["colors", "counting"]})
    metrics = evaluate_pipeline(
        pipeline, dataset, ["brightness"], args=args, adapter=lora, num_images_per_prompt=2, output_dir=str(out)
    )

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics) == ["base", "adapter"]
    keys = ["brightness", "brightness/colors", "brightness/counting", "brightness/mean_over_categories"]
    assert all(sorted(metrics[label]) == sorted(keys) for label in metrics)

    rows = read_csv(out / "samples.csv")
    assert len(rows) == 2 * 2
    assert [(int(r["prompt_index"]), int(r["image_index"])) for r in rows] == [
        (i, j) for i in range(2) for j in (0, 1)
    ]
    assert [r["category"] for r in rows] == ["colors", "colors", "counting", "counting"]
    for label in metrics:  # the means, recomputed in float64 from the per-sample column
        column = torch.tensor([float(r[f"{label}/brightness"]) for r in rows], dtype=torch.float64)
        colors = torch.tensor([r["category"] == "colors" for r in rows])
        assert metrics[label]["brightness"] == pytest.approx(column.mean().item(), abs=1e-7)
        assert metrics[label]["brightness/colors"] == pytest.approx(column[colors].mean().item(), abs=1e-7)
        assert metrics[label]["brightness/counting"] == pytest.approx(column[~colors].mean().item(), abs=1e-7)
        expected = (column[colors].mean() + column[~colors].mean()).item() / 2
        assert metrics[label]["brightness/mean_over_categories"] == pytest.approx(expected, abs=1e-7)
    # the trained LoRA changes every sample
    assert all(r["base/brightness"] != r["adapter/brightness"] for r in rows)

    # sample i * M + j starts from the noise of global index i * M + j: the base column is the pipeline's own samples
    trainer = DanceGRPOTrainer(model=pipeline, reward_funcs="brightness", args=args)
    prompts = [p for p in dataset["prompt"] for _ in (0, 1)]
    images, _ = trainer.generate(prompts, seed=7, eta=0.0, first=0)
    expected = images.double().flatten(1).mean(1)
    assert [float(r["base/brightness"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)

    # the LoRA was taken out again: the pipeline evaluates as before
    again = evaluate_pipeline(pipeline, dataset, ["brightness"], args=args, num_images_per_prompt=2, progress=False)
    assert again["base"] == pytest.approx(metrics["base"], abs=1e-7)

    grid = Image.open(out / "grid.png")  # 4 samples (rows) x 2 models (columns) of 32 px, padded, a header strip
    assert grid.size == (2 * (32 + GRID_PAD) + GRID_PAD, GRID_HEADER + 4 * (32 + GRID_PAD) + GRID_PAD)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd", "tiny-wan"])
def test_evaluate_pipeline_other_families(name, tiny_pipeline_path, tmp_path):
    def dark(prompts, images, **kwargs):  # any callable: a custom reward next to a registered one
        return (1 - images.flatten(1).mean(1)).tolist()

    overrides = {"num_frames": 5} if name == "tiny-wan" else {}
    metrics = evaluate_pipeline(
        tiny_pipeline_path(name),
        [{"prompt": "a cat"}, {"prompt": "a dog"}],
        ["brightness", dark],
        args=config(tmp_path, **overrides),
        output_dir=str(tmp_path / "eval"),
    )
    assert set(metrics["base"]) == {"brightness", "dark"}
    assert metrics["base"]["brightness"] + metrics["base"]["dark"] == pytest.approx(1.0, abs=1e-6)
    assert len(read_csv(tmp_path / "eval" / "samples.csv")) == 2


def test_trainer_evaluate_per_category(tiny_pipeline_path, tmp_path):
    dataset = Dataset.from_dict(PROMPTS)
    trainer = DanceGRPOTrainer(
        model=tiny_pipeline_path("tiny-flux"), reward_funcs="brightness", args=config(tmp_path), eval_dataset=dataset
    )
    metrics = trainer.evaluate()
    images, _ = trainer.generate(PROMPTS["prompt"], seed=trainer.args.seed, first=0)
    per_image = images.double().flatten(1).mean(1)
    assert metrics == pytest.approx(
        {
            "eval_rewards/brightness/mean": per_image.mean().item(),
            "eval_rewards/brightness/colors/mean": per_image[[0, 2]].mean().item(),
            "eval_rewards/brightness/counting/mean": per_image[1].item(),
        },
        abs=1e-6,
    )


BAD_INPUT_SCRIPT = """
import sys
from trl_dancegrpo.evaluation import main
cases = {cases!r}
for case in cases:
    print("rc", main(case), flush=True)
try:
    main(["--help"])
except SystemExit as exit:
    print("help", exit.code)
print("torch imported:", "torch" in sys.modules)
"""


def test_bad_input_is_refused_before_torch(tmp_path):
    no_prompt = tmp_path / "no_prompt.csv"
    no_prompt.write_text("text\nhello\n")
    lora_less = tmp_path / "empty"
    lora_less.mkdir()
    training_run = tmp_path / "run"  # a training run's folder: its metrics.json must not be overwritten
    (training_run / "checkpoint-2").mkdir(parents=True)
    base = ["--model_name_or_path", "tiny-flux"]
    cases = [
        [*base, "--reward_funcs", "brightnes"],
        [*base, "--reward_funcs", "no_such_package.reward"],
        [*base, "--dataset_name", str(tmp_path / "missing.jsonl")],
        [*base, "--adapter", str(tmp_path / "no_such_folder")],
        [*base, "--adapter", str(lora_less)],
        [*base, "--dataset_name", str(no_prompt)],
        [*base, "--num_images_per_prompt", "0"],
        [*base, "--reward_kwargs", '{"clip_score": {}}'],
        [*base, "--output_dir", str(training_run)],
    ]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", BAD_INPUT_SCRIPT.format(cases=cases)], capture_output=True, text=True, env=env
    )
    status = [line for line in result.stdout.splitlines() if line.startswith(("rc ", "help ", "torch imported"))]
    assert status == ["rc 2"] * len(cases) + ["help 0", "torch imported: False"], result.stderr
    assert "--num_images_per_prompt" in result.stdout and "--adapter" in result.stdout  # the --help text
    errors = [line for line in result.stderr.splitlines() if line.startswith("trl-dancegrpo evaluate: error:")]
    assert len(errors) == len(cases)
    for error, needle in zip(
        errors,
        [
            "Unknown reward 'brightnes'. Did you mean 'brightness'?",
            "the module 'no_such_package' of that import path cannot be found",
            "missing.jsonl: file not found",
            "no_such_folder: no such folder",
            "neither a LoRA",
            "no 'prompt' column",
            "--num_images_per_prompt must be positive",
            "reward_kwargs has an entry for 'clip_score', which is not one of the rewards named in reward_funcs",
            "that folder holds a training run, whose metrics.json this evaluation would overwrite",
        ],
    ):
        assert needle in error


def run_cli(args, timeout=600, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [*launcher, "-m", "trl_dancegrpo", "evaluate", *args] if launcher else None
    command = command or [sys.executable, "-m", "trl_dancegrpo", "evaluate", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_command_line_one_and_two_processes(tiny_pipeline_path, tmp_path):
    from trl_dancegrpo.loading import load_pipeline

    path = tiny_pipeline_path("tiny-flux")
    lora = train_lora(path, tmp_path / "lora", tmp_path)
    fused = load_pipeline(path)  # a second model: the same LoRA fused into the weights
    fused.load_lora_weights(lora)
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.save_pretrained(str(tmp_path / "fused"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in zip(*PROMPTS.values())))
    common = ["--model_name_or_path", path, "--dataset_name", str(data), "--adapter", lora, "--seed", "3"]
    common += ["--tuned_model_name_or_path", str(tmp_path / "fused")]
    common += ["--reward_funcs", "brightness", "jpeg_compressibility", "--num_images_per_prompt", "3"]
    common += ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--per_device_eval_batch_size", "2"]
    result = run_cli([*common, "--output_dir", str(tmp_path / "one")])
    assert "Wrote metrics.json" in result.stdout
    assert "base: 100%" in result.stderr and "adapter: 100%" in result.stderr  # the progress bars
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert list(one) == ["base", "adapter", "tuned"] and one["base"] != one["adapter"]
    assert "jpeg_compressibility/counting" in one["adapter"]
    assert one["tuned"]["brightness"] == pytest.approx(one["adapter"]["brightness"], abs=1e-5)  # LoRA = fused LoRA
    assert len(read_csv(tmp_path / "one" / "samples.csv")) == 9
    assert (tmp_path / "one" / "grid.png").is_file()

    # 9 samples over 2 processes (5 + 4, the last padded): the same samples and scores as one process
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_cli([*common, "--output_dir", str(tmp_path / "two")], launcher=launcher)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for label in one:
        assert two[label] == pytest.approx(one[label], abs=1e-5)
    rows_one, rows_two = read_csv(tmp_path / "one" / "samples.csv"), read_csv(tmp_path / "two" / "samples.csv")
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a["prompt"] == b["prompt"]
        for key in ("base/brightness", "adapter/brightness", "tuned/brightness"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5)
