"""Safe checkpoints: one run per output_dir, compatibility checked before a resume, clear errors for broken files.

- [`check_output_dir`]: a new run refuses an `output_dir` holding another run's checkpoints (unless it resumes, or
  `overwrite_output_dir` deletes them first), so two runs never mix their checkpoints and `save_total_limit` never
  deletes a checkpoint of an earlier run; resuming from an earlier checkpoint while later ones exist is refused too;
- [`write_checkpoint_info`] / [`check_compatible`]: each checkpoint records the model family, the LoRA settings and
  the trainable parameters; a resume with different ones is an error naming the checkpoint and the setting;
- [`unreadable_file_error`], [`warn_missing_state_files`], [`check_finite_weights`]: a truncated or corrupted file is
  named with its checkpoint and the previous one is suggested; missing optimizer/scheduler/RNG files are a warning;
- [`write_manifest`] / [`verify_manifest`]: each checkpoint lists the size and SHA-256 of every file it holds, checked
  before a resume reads any of them, so a file changed after saving (even one that still reads, with finite values)
  is named instead of resumed from;
- [`clear_previous_run`]: `overwrite_output_dir` removes what an earlier run wrote (checkpoints, samples, TensorBoard
  logs, saved weights, card, metrics), so the new run's samples and curves are not mixed with the old ones;
- [`save_rollout_buffer`] / [`load_rollout_buffer`]: the rollout that later optimizer steps still train on (with
  `steps_per_generation > gradient_accumulation_steps` or `num_iterations > 1`) is saved with the checkpoint, so a
  resume continues exactly.
"""

import glob
import hashlib
import json
import os
import re
import shutil

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHECKPOINT_INFO_NAME = "dancegrpo_checkpoint.json"
MANIFEST_NAME = "dancegrpo_manifest.json"
ROLLOUT_BUFFER_NAME = "rollout_buffer.pt"
STATE_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "RNG state": "rng_state*.pth"}


def _step_of(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else -1


def list_checkpoints(folder: str) -> list[str]:
    """The complete `checkpoint-N` folders of `folder`, by step (a half-written `tmp-checkpoint-N` is not one)."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, name) for name in os.listdir(folder) if re.fullmatch(r"checkpoint-\d+", name)]
    return sorted((path for path in found if os.path.isdir(path)), key=_step_of)


def previous_checkpoint(checkpoint: str) -> str | None:
    earlier = [
        path
        for path in list_checkpoints(os.path.dirname(os.path.normpath(checkpoint)))
        if _step_of(path) < _step_of(checkpoint)
    ]
    return earlier[-1] if earlier else None


def _suggest_previous(checkpoint: str) -> str:
    previous = previous_checkpoint(checkpoint)
    if previous is None:
        return "There is no earlier checkpoint in that folder: start afresh."
    return f"Resume from the previous checkpoint instead: resume_from_checkpoint={previous!r}."


# -- one run per output_dir -------------------------------------------------------------------------------------------
def check_output_dir(args, resume_from_checkpoint, is_main_process: bool) -> None:
    """Refuse to start a new run where another run left checkpoints; with `overwrite_output_dir`, delete what it
    wrote (`clear_previous_run`)."""
    if isinstance(resume_from_checkpoint, str):
        _check_no_later_checkpoints(args, resume_from_checkpoint)
    if resume_from_checkpoint not in (None, False):
        return
    existing = list_checkpoints(args.output_dir)
    if existing and not args.overwrite_output_dir:
        names = ", ".join(os.path.basename(path) for path in existing)
        raise ValueError(
            f"output_dir {args.output_dir!r} already holds checkpoints of an earlier run ({names}). Resume that run "
            "with resume_from_checkpoint=True (--resume_from_checkpoint true), start afresh and delete them with "
            "overwrite_output_dir=True (--overwrite_output_dir), or choose another output_dir."
        )
    if args.overwrite_output_dir and is_main_process:
        clear_previous_run(args.output_dir)


# What a run writes into its output_dir: removed by `overwrite_output_dir` (and nothing else of the folder).
RUN_FOLDERS = ("_samples", "images", "runs", "ema")  # samples, the card's images, TensorBoard's default logs, EMA
RUN_FILES = ("metrics.json", "reward_curve.png", "training_args.json", "pytorch_lora_weights.safetensors")
SAVED_MODEL_FILES = re.compile(r"(config\.json|diffusion_pytorch_model.*\.safetensors(\.index\.json)?)")


def _written_by_a_run(path: str) -> bool:
    name = os.path.basename(path)
    if name in RUN_FOLDERS:
        return os.path.isdir(path)
    if name in RUN_FILES or re.fullmatch(r"(tmp-)?checkpoint-\d+", name):
        return True
    if name in ("transformer", "transformer_2"):  # Wan 2.2's fully fine-tuned experts
        return os.path.isfile(os.path.join(path, "config.json"))
    if name == "README.md":  # the model card, not a README of the user's
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "trl-dancegrpo" in handle.read()
    return os.path.isfile(path) and bool(SAVED_MODEL_FILES.fullmatch(name))  # a fully fine-tuned denoiser


def previous_run_outputs(output_dir: str) -> list[str]:
    """The files and folders an earlier run wrote into `output_dir` (none if it holds no sign of one)."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    if not ({"training_args.json", "_samples", "metrics.json"} & set(names) or list_checkpoints(output_dir)):
        return []
    return [os.path.join(output_dir, name) for name in names if _written_by_a_run(os.path.join(output_dir, name))]


def clear_previous_run(output_dir: str) -> None:
    """Remove what an earlier run wrote into `output_dir`, saying what (the user asked to overwrite it)."""
    found = previous_run_outputs(output_dir)
    if not found:
        return
    logger.warning(
        f"overwrite_output_dir: deleting what the earlier run wrote in {output_dir}: "
        f"{', '.join(os.path.basename(path) for path in found)}."
    )
    for path in found:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _check_no_later_checkpoints(args, checkpoint: str) -> None:
    """Resuming from an earlier checkpoint of output_dir would overwrite (and rotate away) the later ones: refuse."""
    if os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) != os.path.realpath(args.output_dir):
        return
    later = [path for path in list_checkpoints(args.output_dir) if _step_of(path) > _step_of(checkpoint)]
    if later and not args.overwrite_output_dir:
        names = ", ".join(os.path.basename(path) for path in later)
        raise ValueError(
            f"Resuming from {checkpoint} would overwrite the later checkpoints of {args.output_dir!r} ({names}) as "
            "training goes on. Resume from the latest one (resume_from_checkpoint=True), move the later ones away, "
            "or set overwrite_output_dir=True to let this run replace them."
        )


# -- what a checkpoint was trained with -------------------------------------------------------------------------------
def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers FSDP and activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def checkpoint_info(trainer) -> dict:
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    info = {
        "pipeline": type(trainer.pipeline).__name__,
        "denoiser": type(denoiser).__name__,
        "lora": None,
        "algorithm": trainer.args.algorithm,
        "trainable_parameters": sorted(
            _plain_name(name) for name, p in denoiser.named_parameters() if p.requires_grad
        ),
    }
    if trainer.is_lora:
        lora = denoiser.peft_config["default"]
        targets = lora.target_modules
        info["lora"] = {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
    return info


def write_checkpoint_info(trainer, folder: str) -> None:
    with open(os.path.join(folder, CHECKPOINT_INFO_NAME), "w", encoding="utf-8") as handle:
        json.dump(checkpoint_info(trainer), handle, indent=1)


def _saved_lora_metadata(checkpoint: str) -> dict | None:
    """LoRA rank, alpha and targets from the adapter metadata diffusers stores in the safetensors header."""
    from safetensors import safe_open

    path = os.path.join(checkpoint, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise unreadable_file_error(path, checkpoint, error) from None
    for key, value in metadata.items():
        if key.endswith("lora_adapter_metadata"):
            # diffusers prefixes each entry with the component: {"transformer.r": 4, ...}
            saved = {name.split(".", 1)[-1]: item for name, item in json.loads(value).items()}
            targets = saved.get("target_modules")
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            return {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "target_modules": targets}
    return None


def _trained(info: dict, denoiser_key: str) -> str:
    """What a run trains, in words: "a LoRA adapter (r=4, lora_alpha=8, target_modules=[...])" or "the full
    denoiser (FluxTransformer2DModel)"."""
    lora = info.get("lora")
    if lora:
        settings = ", ".join(f"{key}={lora[key]!r}" for key in ("r", "lora_alpha", "target_modules") if key in lora)
        return f"a LoRA adapter ({settings})"
    denoiser = info.get(denoiser_key)
    return f"the full denoiser ({denoiser})" if denoiser else "the full denoiser"


def check_compatible(trainer, checkpoint: str) -> None:
    """Raise a `ValueError` naming the checkpoint and the setting if it was trained with another model or LoRA."""
    current = checkpoint_info(trainer)
    path = os.path.join(checkpoint, CHECKPOINT_INFO_NAME)
    if os.path.isfile(path):
        saved = read_json_file(path, checkpoint)
    else:  # written before this file existed: what the LoRA's own metadata tells
        saved = {"lora": _saved_lora_metadata(checkpoint)} if trainer.is_lora else {}
    fix = "resume with the settings it was trained with, or start afresh in another output_dir"
    for key in ("pipeline", "denoiser"):
        if key in saved and saved[key] != current[key]:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was trained on a {saved[key]} ({key}), this run trains a "
                f"{current[key]}; {fix}."
            )
    if saved.get("algorithm", "grpo") != current["algorithm"]:  # written before the field existed: GRPO's
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with algorithm={saved.get('algorithm', 'grpo')!r}, this "
            f"run uses algorithm={current['algorithm']!r} (its rollout buffer and optimizer state belong to the other "
            f"objective); {fix}."
        )
    if "lora" in saved and (saved["lora"] is None) != (current["lora"] is None):
        raise ValueError(
            f"Cannot resume from {checkpoint}: it holds {_trained(saved, 'denoiser')}, this run trains "
            f"{_trained(current, 'denoiser')}; {fix}."
        )
    if saved.get("lora") and current["lora"]:
        for setting in ("r", "lora_alpha", "target_modules"):
            if saved["lora"].get(setting) is not None and saved["lora"][setting] != current["lora"][setting]:
                raise ValueError(
                    f"Cannot resume from {checkpoint}: its LoRA has {setting}={saved['lora'][setting]!r}, this run's "
                    f"peft_config has {setting}={current['lora'][setting]!r}; {fix}."
                )
    if "trainable_parameters" in saved and saved["trainable_parameters"] != current["trainable_parameters"]:
        saved_names, names = set(saved["trainable_parameters"]), set(current["trainable_parameters"])
        missing, extra = sorted(names - saved_names), sorted(saved_names - names)
        raise ValueError(
            f"Cannot resume from {checkpoint}: it trained another set of parameters ({len(missing)} of this run's "
            f"trainable parameters are not in it, e.g. {missing[:2]}; {len(extra)} of its are not trained here, e.g. "
            f"{extra[:2]}); {fix}."
        )


def check_loaded_keys(checkpoint: str, missing_keys, unexpected_keys) -> None:
    """After loading a LoRA: every adapter weight must have come from the checkpoint, and nothing else."""
    missing = [key for key in missing_keys or [] if "lora_" in key]
    if missing or unexpected_keys:
        raise ValueError(
            f"The LoRA in {checkpoint} does not match this run's adapter (missing keys such as {missing[:3]}, "
            f"unexpected keys such as {list(unexpected_keys or [])[:3]}); resume with the same model and peft_config."
        )


# -- broken or incomplete checkpoints ---------------------------------------------------------------------------------
def unreadable_file_error(path: str, checkpoint: str, error: BaseException) -> ValueError:
    return ValueError(
        f"Cannot read {os.path.basename(path)} of the checkpoint {checkpoint} (truncated or corrupted? "
        f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}). "
        f"{_suggest_previous(checkpoint)}"
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: str) -> list[str]:
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.relpath(os.path.join(root, name), folder) for name in names if name != MANIFEST_NAME]
    return sorted(files)


def write_manifest(folder: str) -> None:
    """Record the size and SHA-256 of every file of the checkpoint `folder` (written last, once all are there).

    Hashing reads the whole checkpoint once more (about a second per GB on one core): a LoRA checkpoint takes a
    moment, a full FLUX one (weights and optimizer, ~70 GB) about a minute per save and per resume.
    """
    files = {
        name: {"size": os.path.getsize(os.path.join(folder, name)), "sha256": _sha256(os.path.join(folder, name))}
        for name in _checkpoint_files(folder)
    }
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as handle:
        json.dump({"algorithm": "sha256", "files": files}, handle, indent=1)


def verify_manifest(checkpoint: str) -> None:
    """Before a resume reads anything: every file the manifest lists is there, with its size and checksum.

    A checkpoint written before manifests existed has none and is not checked; an unreadable manifest is named.
    """
    path = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            files = json.load(handle)["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise unreadable_file_error(path, checkpoint, error) from None
    for name, (size, checksum) in expected.items():
        file = os.path.join(checkpoint, name)
        if not os.path.isfile(file):
            problem = "missing: it was saved with the checkpoint and has been removed since"
        elif os.path.getsize(file) != size:
            problem = f"changed after it was saved: {os.path.getsize(file)} bytes, {size} when saved"
        elif _sha256(file) != checksum:
            problem = f"changed after it was saved: its SHA-256 differs from the one in {MANIFEST_NAME}"
        else:
            continue
        raise ValueError(
            f"Cannot read {name} of the checkpoint {checkpoint} ({problem}). {_suggest_previous(checkpoint)}"
        )


def read_json_file(path: str, checkpoint: str) -> dict:
    """A JSON file of the checkpoint; unreadable or malformed, it is named with the checkpoint."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise unreadable_file_error(path, checkpoint, error) from None


def unreadable_state_file(checkpoint: str, names: tuple[str, ...]) -> str:
    """Of files loaded one after the other, the first that `torch.load` cannot read (else the first): the file to
    name when their loading failed somewhere."""
    for name in names:
        path = os.path.join(checkpoint, name)
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            continue
        except Exception:
            return path
    return os.path.join(checkpoint, names[0])


def warn_missing_state_files(checkpoint: str) -> None:
    missing = [what for what, pattern in STATE_FILES.items() if not glob.glob(os.path.join(checkpoint, pattern))]
    if missing:
        logger.warning(
            f"The checkpoint {checkpoint} has no {', no '.join(missing)} file: training resumes with a fresh "
            f"{' and '.join(missing)} (saved with save_only_model=True, or copied incompletely?), so it will not "
            "continue exactly as the original run would have."
        )


def check_finite_weights(module: torch.nn.Module, checkpoint: str) -> None:
    """NaN or infinite trainable weights right after a resume: the checkpoint's fault, not the rewards'."""
    for name, param in module.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise ValueError(
                f"The weights loaded from {checkpoint} are not finite (NaN or inf in {name}): training had diverged "
                f"before that checkpoint was saved. {_suggest_previous(checkpoint)}"
            )


# -- the rollout several optimizer steps train on ---------------------------------------------------------------------
def _buffer_path(folder: str, suffix: str) -> str:
    return os.path.join(folder, ROLLOUT_BUFFER_NAME.replace(".pt", f"{suffix}.pt"))


def save_rollout_buffer(folder: str, step: int, chunks: list[dict], suffix: str = "") -> None:
    """Save this process's buffered rollout (dicts of tensors) and the micro-step counter it belongs to."""
    torch.save({"step": step, "chunks": chunks}, _buffer_path(folder, suffix))


def load_rollout_buffer(checkpoint: str, device, suffix: str = "") -> dict | None:
    path = _buffer_path(checkpoint, suffix)
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise unreadable_file_error(path, checkpoint, error) from None
    return _to_device(saved, device)


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def save_checkpoint(trainer, trial) -> None:
    """The trainer's `_save_checkpoint`: write the checkpoint into a staging folder, rename it into place once complete.

    A save interrupted half-way leaves only `tmp-checkpoint-N`, which `resume_from_checkpoint=True` ignores (it looks
    for `checkpoint-N`), so an interrupted save never looks like a valid checkpoint. Next to transformers' files it
    holds the checkpoint info, the rollout buffer when later steps still train on it, the exact EMA (one file per
    process when FSDP shards it) and, last, the manifest.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    from .ema import EMA_STATE_NAME

    args, accelerator = trainer.args, trainer.accelerator
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    final_dir, staging = os.path.join(run_dir, name), os.path.join(run_dir, f"tmp-{name}")
    if args.should_save and os.path.isdir(staging):
        shutil.rmtree(staging)  # the leftover of an earlier interrupted save
    accelerator.wait_for_everyone()
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    trainer.save_model(staging, _internal_call=True)
    if args.should_save:
        write_checkpoint_info(trainer, staging)
    ema_file = trainer._ema_state_name() if trainer.ema is not None else None
    if ema_file is not None and (args.should_save or ema_file != EMA_STATE_NAME):
        os.makedirs(staging, exist_ok=True)
        trainer.ema.save(os.path.join(staging, ema_file))
    if not args.save_only_model:
        trainer._save_optimizer_and_scheduler(staging)
        trainer._save_scaler(staging)
        trainer._save_rng_state(staging)
        rollout = trainer._rollout_buffer_to_save()
        if rollout is not None:  # every process its own part of the rollout
            os.makedirs(staging, exist_ok=True)
            suffix = f"_{accelerator.process_index}" if accelerator.num_processes > 1 else ""
            save_rollout_buffer(staging, trainer._micro_step, rollout, suffix)
    if args.should_save:
        for callback in [*trainer.callback_handler.callbacks, trainer.control]:
            if isinstance(callback, ExportableState):
                trainer.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
        trainer.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
    accelerator.wait_for_everyone()
    if args.should_save:
        write_manifest(staging)  # last: every process's files are in
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)  # atomic on one file system
    accelerator.wait_for_everyone()
    if args.push_to_hub:
        trainer._push_from_checkpoint(final_dir)  # refreshes the card in output_dir, then uploads
    else:
        trainer._write_model_card(args.output_dir)  # as TRL: output_dir always has the current card
    if args.should_save:
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=False,
        )
