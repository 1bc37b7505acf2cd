"""The `trl-dancegrpo` command (also `python -m trl_dancegrpo`), built like `trl grpo`.

    accelerate launch -m trl_dancegrpo --config recipe.yaml
    trl-dancegrpo --model_name_or_path black-forest-labs/FLUX.1-dev --dataset_name prompts.txt \\
        --reward_funcs hpsv2.1 clip_score --use_peft --lora_r 128 --lora_alpha 256 --output_dir flux-dancegrpo

With no model and no `--config`, it runs the built-in offline demo: a tiny random FLUX pipeline trained with LoRA on
the weight-free brightness reward for 40 steps (a minute on a laptop CPU), writing the LoRA, `metrics.json` and
`reward_curve.png` into `--output_dir` (default `dancegrpo-demo`).
"""

import json
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field


# Nothing heavy at the top: the options are checked (cli_checks.precheck) before torch and transformers are imported.


DEMO_PROMPTS = [
    "a cat on a sofa",
    "a red car in the rain",
    "a lighthouse at night",
    "a bowl of fruit",
    "a snowy mountain",
    "a city street",
    "a forest path",
    "a portrait of an old man",
]

# Settings of the built-in demo; every one can still be overridden on the command line.
TINY_DEMO_DEFAULTS = {
    "model_name_or_path": "tiny-flux",
    "output_dir": "dancegrpo-demo",
    "reward_funcs": ["brightness"],
    "use_peft": True,
    "lora_r": 8,
    "lora_alpha": 8,
    "num_generations": 4,
    "num_inference_steps": 4,
    "per_device_train_batch_size": 16,
    "max_steps": 40,
    "learning_rate": 2e-2,
    "height": 32,
    "width": 32,
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class ScriptArguments:
    """Arguments of the script that are not training settings.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id, or a local `.json`/`.jsonl`/`.csv`/`.parquet` file with a `prompt` column, or a `.txt`
            file with one prompt per line. `None` uses a few built-in prompts.
        dataset_config (`str`, *optional*): Dataset configuration name.
        dataset_train_split (`str`, *optional*, defaults to `"train"`): Split to train on.
        reward_funcs (`list[str]`, *optional*, defaults to `["brightness"]`):
            Registry names (see `trl_dancegrpo.rewards`) or dotted import paths (`my_pkg.my_reward`).
    """

    _argument_group_name = "script arguments"

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or local prompt file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={"help": "Reward registry names or dotted import paths (my_pkg.my_reward)."},
    )


@dataclass
class ModelArguments:
    """The pipeline to train and its LoRA (same option names as `trl grpo`).

    Args:
        model_name_or_path (`str`, *optional*):
            Hub id or local path of a diffusers pipeline; `tiny-flux` / `tiny-sd` build a tiny random one.
        dtype (`str`, *optional*, defaults to `"float32"`):
            dtype the pipeline is loaded in; frozen components follow `--bf16`/`--fp16` anyway.
        use_peft (`bool`, *optional*, defaults to `False`): Train a LoRA instead of the whole denoiser.
        lora_r (`int`, *optional*, defaults to `16`): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `32`): LoRA alpha.
        lora_dropout (`float`, *optional*, defaults to `0.0`): LoRA dropout (disabled in training anyway, see docs).
        lora_target_modules (`list[str]`, *optional*): Module name suffixes; `None` = the model family's defaults.
    """

    _argument_group_name = "model and LoRA arguments"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pipeline Hub id or path; tiny-flux/tiny-sd."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype to load the pipeline in.", "choices": ["float32", "bfloat16", "float16"]},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "LoRA target module suffixes."})


INHERITED_GROUP = "inherited transformers.TrainingArguments options"
CHANGED_DEFAULTS_GROUP = "training options whose defaults differ from transformers.TrainingArguments"
OTHER_GROUP = "other DanceGRPO options"


def config_sections(config_class) -> dict[str, str]:
    """Field name -> the heading of `DanceGRPOConfig`'s docstring it is listed under ("sampling (the rollout)", ...)."""
    from .cli_checks import config_sections as sections_of

    return sections_of(config_class.__doc__)


SUBCOMMANDS = {
    "estimate-memory": "peak GPU memory per process of a run, at the real size on fake tensors (offline, no weights)",
    "evaluate": "deterministic samples of a prompt set scored by rewards: a model, and a trained adapter next to it",
}
USAGE = (
    "%(prog)s [--config RECIPE.yaml] [--model_name_or_path ID_OR_PATH] [--dataset_name DATA] "
    "[--reward_funcs NAME [NAME ...]] [--use_peft] [any DanceGRPOConfig option]\n"
    "       %(prog)s {" + ",".join(SUBCOMMANDS) + "} --help"
)
DESCRIPTION = (
    "DanceGRPO fine-tuning of a diffusers pipeline. With no --model_name_or_path and no --config, runs an offline demo "
    "on a tiny random FLUX pipeline. Samples of the latest rollout are saved to OUTPUT_DIR/_samples/ at each logging "
    "step (--log_samples)."
)
EPILOG = "subcommands (each with its own --help):\n" + "\n".join(
    f"  {name:<18}{text}" for name, text in SUBCOMMANDS.items()
)
HELP_GROUPS = {
    "model": "model and LoRA",
    "data": "data",
    "changed": CHANGED_DEFAULTS_GROUP,
    "other": OTHER_GROUP,
    "inherited": INHERITED_GROUP,
}


def print_help() -> None:
    """`--help`, built from the sources without importing torch (the same options and groups as `make_parser`)."""
    from .cli_checks import help_parser

    help_parser(ModelArguments, ScriptArguments, HELP_GROUPS, USAGE, DESCRIPTION, EPILOG).print_help()


def make_parser():
    """`TrlParser` over the script, training and model arguments; `--config recipe.yaml` sets their defaults.

    `--help` lists the DanceGRPO options first (model and LoRA, data, then one group per section of
    `DanceGRPOConfig`), and the inherited `TrainingArguments` options after them, under their own heading.
    """
    import dataclasses
    from typing import get_type_hints

    from trl import TrlParser

    from .config import DanceGRPOConfig

    own_fields = set(DanceGRPOConfig.__annotations__)
    sections = config_sections(DanceGRPOConfig)

    class Parser(TrlParser):
        def error(self, message):  # one line, not argparse's usage block of every TrainingArguments option
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

        def _group(self, title: str):
            if title not in self._groups_by_title:
                self._groups_by_title[title] = self.add_argument_group(title)
            return self._groups_by_title[title]

        def _add_dataclass_arguments(self, dtype):
            if not hasattr(self, "_groups_by_title"):  # created in display order
                self._groups_by_title = {}
                for title in ("model and LoRA", "data", *dict.fromkeys(sections.values())):
                    self._group(title)
            hints = get_type_hints(dtype)
            for f in dataclasses.fields(dtype):
                if not f.init:
                    continue
                f.type = hints[f.name]
                if dtype is ModelArguments:
                    title = "model and LoRA"
                elif dtype is ScriptArguments:
                    title = "data" if f.name.startswith("dataset") else sections.get("reward_weights", "rewards")
                elif f.name in sections:
                    title = sections[f.name]
                elif f.name in own_fields:
                    title = CHANGED_DEFAULTS_GROUP if hasattr(DanceGRPOConfig.__mro__[1], f.name) else OTHER_GROUP
                else:
                    title = INHERITED_GROUP
                self._parse_dataclass_field(self._group(title), f)
            if dtype is ModelArguments:  # the last dataclass: the inherited options go last
                for title in (CHANGED_DEFAULTS_GROUP, OTHER_GROUP, INHERITED_GROUP):
                    group = self._groups_by_title.pop(title, None)
                    if group is not None:
                        self._action_groups.remove(group)
                        self._action_groups.append(group)

    return Parser(
        (ScriptArguments, DanceGRPOConfig, ModelArguments),
        prog="trl-dancegrpo",
        allow_abbrev=False,  # `--learning_rat` must not silently mean `--learning_rate`
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
    )


def load_prompts(script_args: ScriptArguments):
    """The training prompts as a `datasets.Dataset` with a `prompt` column."""
    from datasets import Dataset, load_dataset

    from .cli_checks import check_dataset_name

    name = script_args.dataset_name
    if name is None:
        return Dataset.from_dict({"prompt": DEMO_PROMPTS})
    check_dataset_name(name)  # a missing local file is not looked up on the Hub
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower().lstrip(".")
        if extension == "txt":
            with open(name, encoding="utf-8") as handle:
                prompts = [line.strip() for line in handle if line.strip()]
            return Dataset.from_dict({"prompt": prompts})
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(extension)
        if builder is None:
            raise ValueError(
                f"--dataset_name {name}: unsupported file type; use .txt, .json, .jsonl, .csv or .parquet."
            )
        return load_dataset(builder, data_files=name, split="train")
    return load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)


def load_model(model_args: ModelArguments):
    import torch

    from .loading import load_pipeline
    from .tiny import TINY_PIPELINES, build_tiny_pipeline

    if model_args.model_name_or_path in TINY_PIPELINES:
        return build_tiny_pipeline(model_args.model_name_or_path)
    return load_pipeline(model_args.model_name_or_path, dtype=getattr(torch, model_args.dtype))


def save_metrics(trainer, output_dir: str) -> None:
    """Write the logged metrics (`metrics.json`) and the reward curve (`reward_curve.png`) into `output_dir`."""
    from .plotting import plot_reward_curve

    if not trainer.is_world_process_zero():
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(trainer.state.log_history, handle, indent=1)
    plot_reward_curve(trainer.state.log_history, os.path.join(output_dir, "reward_curve.png"))


def save_metrics_callback(trainer):
    """A callback writing `metrics.json` and `reward_curve.png` at the end of training (before a push uploads them)."""
    from transformers import TrainerCallback

    class SaveMetricsCallback(TrainerCallback):
        def __init__(self):
            self._trainer = weakref.ref(trainer)

        def on_train_end(self, args, state, control, **kwargs):
            save_metrics(self._trainer(), args.output_dir)

    return SaveMetricsCallback()


def lora_config(model_args):
    """The LoRA configuration of the model arguments (`use_peft`), or None for full fine-tuning."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
    )


def main(argv=None) -> None:
    """Entry point of `trl-dancegrpo` and `python -m trl_dancegrpo`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["estimate-memory"]:  # the subcommand: same options as training, see trl_dancegrpo/memory/
        from .memory.report import main as estimate_memory_main

        sys.exit(estimate_memory_main(argv[1:]))
    if argv[:1] == ["evaluate"]:  # the subcommand: deterministic samples of a prompt set, scored (evaluation.py)
        from .evaluation import main as evaluate_main

        sys.exit(evaluate_main(argv[1:]))
    if argv and not argv[0].startswith("-"):  # training takes no positional argument: a misspelt subcommand?
        from .cli_checks import did_you_mean

        _fail(f"unknown command {argv[0]!r}.{did_you_mean(argv[0], SUBCOMMANDS)} Commands: {', '.join(SUBCOMMANDS)}")
    if {"-h", "--help"} & set(argv):
        print_help()
        sys.exit(0)
    trainer = run(argv=argv)
    trainer.accelerator.end_training()  # trackers finish; the process group is torn down before the interpreter exits


def _fail(message: str) -> None:
    sys.stderr.write(f"trl-dancegrpo: error: {message} (see --help)\n")
    sys.exit(2)


def run(script_args=None, training_args=None, model_args=None, argv=None):
    """Parse the arguments (unless given as dataclasses), train, save; returns the trainer."""
    if training_args is None:
        argv = list(sys.argv[1:] if argv is None else argv)
        demo = not {"--model_name_or_path", "--config", "-h", "--help"} & set(argv)
        if not {"-h", "--help"} & set(argv):
            from .cli_checks import precheck

            try:
                with warnings.catch_warnings():  # the full check below warns once
                    warnings.simplefilter("ignore")
                    precheck(argv, (ScriptArguments, ModelArguments), TINY_DEMO_DEFAULTS if demo else None)
            except ValueError as error:
                _fail(str(error))
    from .rewards.scoring import resolve_reward_funcs
    from .trainer import DanceGRPOTrainer

    if training_args is None:
        parser = make_parser()
        if demo:
            parser.set_defaults(**TINY_DEMO_DEFAULTS)
        try:
            script_args, training_args, model_args = parser.parse_args_and_config(argv)
        except (ValueError, TypeError, OSError) as error:  # a contradictory setting, an unreadable recipe
            parser.error(str(error))
    if model_args.model_name_or_path is None:
        _fail("--model_name_or_path is required (on the command line or in the --config recipe).")
    peft_config = lora_config(model_args)
    try:
        # rewards and prompts first: a misspelt reward or a missing file must not wait for a large model's download
        resolve_reward_funcs(script_args.reward_funcs, training_args.reward_kwargs)
        train_dataset = load_prompts(script_args)
        trainer = DanceGRPOTrainer(
            model=load_model(model_args),
            reward_funcs=script_args.reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            peft_config=peft_config,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:  # bad input (a missing extra too), before training
        _fail(str(error).splitlines()[0])
    # first in line: the metrics are in the folder when the model card's callback pushes it at the end of train()
    trainer.callback_handler.callbacks.insert(0, save_metrics_callback(trainer))
    trainer.train()
    if not training_args.push_to_hub:  # with push_to_hub, train() has already saved and pushed the result
        trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        print(
            f"Saved the {'LoRA' if peft_config else 'denoiser'}, its model card (README.md), metrics.json, "
            f"reward_curve.png and samples of the rollouts (_samples/) to {os.path.abspath(training_args.output_dir)}"
        )
    return trainer


if __name__ == "__main__":
    main()
