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

# re-exported: `from trl_dancegrpo.cli import ScriptArguments, make_parser` keeps working
from .arguments import (  # noqa: F401
    CHANGED_DEFAULTS_GROUP,
    DEMO_PROMPTS,
    INHERITED_GROUP,
    OTHER_GROUP,
    SUBCOMMANDS,
    ModelArguments,
    ScriptArguments,
    config_sections,
    load_model,
    load_prompts,
    lora_config,
    make_parser,
    print_help,
)


# Nothing heavy at the top: the options are checked (cli_checks.precheck) before torch and transformers are imported.


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
        print(saved_message(training_args, lora=peft_config is not None))
    return trainer


def saved_message(training_args, lora: bool) -> str:
    """The command's last line: what the output folder now holds."""
    weights = "LoRA" if lora else "denoiser"
    ema = f", the EMA of the {weights} (ema/)" if training_args.ema_decay is not None else ""
    return (
        f"Saved the {weights}{ema}, its model card (README.md), metrics.json, reward_curve.png and samples of the "
        f"rollouts (_samples/) to {os.path.abspath(training_args.output_dir)}"
    )


if __name__ == "__main__":
    main()
