"""The command-line arguments of `trl-dancegrpo`: the script and model dataclasses, their parser, the LoRA config.

Imported by the command (`cli.py`) and by `estimate-memory` (`memory/`), so neither imports the other. Nothing heavy at
the top: the parser's imports (trl, the training config) happen when `make_parser` is called.
"""

import os
from dataclasses import dataclass, field


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
    "estimate-memory": "peak GPU memory per process of a run, at the real size on fake tensors, offline, no weights",
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
EPILOG = "subcommands, each with its own --help: " + "; ".join(
    f"{name} ({text})" for name, text in SUBCOMMANDS.items()
)


def option_group(name: str, origin: str, sections: dict[str, str], own: bool, inherited: bool) -> str:
    """The `--help` heading of the option `name`: `origin` is "model" or "script" (the dataclasses above) or "config"
    (`DanceGRPOConfig`, whose own fields are `own` and whose `TrainingArguments` fields are `inherited`; both for an
    inherited field whose default we change). Used by the full parser and by the fast `--help` alike."""
    if origin == "model":
        return "model and LoRA"
    if origin == "script":
        return "data" if name.startswith("dataset") else sections.get("reward_weights", "rewards")
    if name in sections:
        return sections[name]
    if own:
        return CHANGED_DEFAULTS_GROUP if inherited else OTHER_GROUP
    return INHERITED_GROUP


# the headings in display order: these two first, the config's sections, then these three
LEADING_GROUPS, TRAILING_GROUPS = ("model and LoRA", "data"), (CHANGED_DEFAULTS_GROUP, OTHER_GROUP, INHERITED_GROUP)


def print_help() -> None:
    """`--help`, built from the sources without importing torch (the same options and groups as `make_parser`)."""
    from .cli_checks import help_parser

    parser = help_parser(ModelArguments, ScriptArguments, option_group, LEADING_GROUPS, TRAILING_GROUPS)
    parser.usage, parser.description, parser.epilog = USAGE, DESCRIPTION, EPILOG
    parser.print_help()


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
                for title in (*LEADING_GROUPS, *dict.fromkeys(sections.values())):
                    self._group(title)
            hints = get_type_hints(dtype)
            origin = {ModelArguments: "model", ScriptArguments: "script"}.get(dtype, "config")
            for f in dataclasses.fields(dtype):
                if not f.init:
                    continue
                f.type = hints[f.name]
                own, inherited = f.name in own_fields, hasattr(DanceGRPOConfig.__mro__[1], f.name)
                title = option_group(f.name, origin, sections, own, inherited)
                self._parse_dataclass_field(self._group(title), f)
            if dtype is ModelArguments:  # the last dataclass: the inherited options go last
                for title in TRAILING_GROUPS:
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
