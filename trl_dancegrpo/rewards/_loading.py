"""Where reward weights come from: local paths or the Hugging Face Hub, loaded safely, with one clear offline error.

Every model reward resolves its files here, so all of them fail the same way when the Hub cannot be reached: one
[`RewardModelNotFoundError`] naming the repository, the file(s) and the constructor argument that takes a local
path, instead of a traceback from deep inside `huggingface_hub`. Weights are read with
`torch.load(..., weights_only=True)` or safetensors; no arbitrary object is ever unpickled.
"""

import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import torch


class RewardModelNotFoundError(OSError):
    """A reward model's weights are neither at the given local path nor downloadable from the Hub."""


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached right now (offline mode, or its host does not resolve), or `None`.

    Checked before each download so that a machine without network fails at once (from the local cache only):
    huggingface_hub would otherwise retry every request with backoff for half a minute.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be resolved (no network)"
    return None


def _not_found(
    repo_id: str,
    files: Sequence[str],
    argument: str,
    error: BaseException,
    unreachable: str | None,
    alternatives: bool = False,
) -> RewardModelNotFoundError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if unreachable is not None:
        reason = f"{unreachable} and it is not in the local cache"
    elif isinstance(error, LocalEntryNotFoundError):
        reason = "the Hub cannot be reached and it is not in the local cache"
    else:
        first_line = (str(error).strip().splitlines() or [""])[0]
        reason = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    if alternatives:  # files that are alternatives to one another: any of them will do
        what, command = " or ".join(files), f"hf download {repo_id} {files[0]} --local-dir DIR"
    else:  # file patterns that are all needed
        patterns = " ".join(f"'{pattern}'" for pattern in files)
        what, command = ", ".join(files), f"hf download {repo_id} --include {patterns} --local-dir DIR"
    return RewardModelNotFoundError(
        f"Could not get {what} from the Hugging Face Hub repository {repo_id!r} ({reason}). Download it on a "
        f"machine with Hub access (`{command}`) and pass the local path with `{argument}=...`."
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    # `OSError` covers connection failures and timeouts (`ConnectionError`, `TimeoutError`; httpx's errors are
    # wrapped by huggingface_hub); `ValueError` covers malformed repository ids.
    return (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, HFValidationError, OSError, ValueError)


def hub_file(repo_id: str, filename: str | Sequence[str], *, argument: str, revision: str | None = None) -> str:
    """Download `filename` from the Hub repository `repo_id` (or find it in the cache) and return its local path.

    Args:
        repo_id (`str`):
            Hub repository, e.g. `"xswu/HPSv2"`.
        filename (`str` or `list[str]`):
            Path of the file inside the repository; several are alternatives, tried in order.
        argument (`str`):
            Name of the constructor argument that takes a local path instead; quoted in the error message.
        revision (`str`, *optional*):
            Branch, tag or commit.

    Raises:
        [`RewardModelNotFoundError`]: when the file cannot be downloaded and is not cached.
    """
    from huggingface_hub import hf_hub_download

    filenames = [filename] if isinstance(filename, str) else list(filename)
    unreachable = _hub_unreachable()
    first_error = None
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, revision=revision, local_files_only=unreachable is not None)
        except _hub_errors() as error:
            first_error = first_error or error
    raise _not_found(repo_id, filenames, argument, first_error, unreachable, alternatives=True) from None


def hub_snapshot(repo_id: str, allow_patterns: Sequence[str], *, argument: str, revision: str | None = None) -> str:
    """Download the files of `repo_id` matching `allow_patterns` (or find them in the cache); return the folder.

    Only the matching files are fetched, so e.g. a processor's JSON files can be taken from a repository that also
    holds gigabytes of weights.

    Raises:
        [`RewardModelNotFoundError`]: when the files cannot be downloaded and are not cached.
    """
    from huggingface_hub import snapshot_download

    unreachable = _hub_unreachable()
    try:
        return snapshot_download(
            repo_id, allow_patterns=list(allow_patterns), revision=revision, local_files_only=unreachable is not None
        )
    except _hub_errors() as error:
        raise _not_found(repo_id, list(allow_patterns), argument, error, unreachable) from None


def local_or_hub_file(path: str | None, repo_id: str, filename: str, *, argument: str) -> str:
    """Return `path` if given (it must exist), else the Hub file `repo_id/filename`."""
    if path is None:
        return hub_file(repo_id, filename, argument=argument)
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}` points to {path!r}, which is not a file.")
    return path


def local_or_hub_dir(name_or_path: str, allow_patterns: Sequence[str], *, argument: str) -> str:
    """Return `name_or_path` if it is a local folder, else download the matching files of that Hub repository."""
    expanded = os.path.expanduser(str(name_or_path))
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise NotADirectoryError(f"`{argument}` points to {expanded!r}, which is a file; pass its folder.")
    if expanded.startswith((os.sep, ".")) or expanded.count("/") != 1:
        raise FileNotFoundError(
            f"`{argument}={name_or_path!r}` is neither an existing folder nor a Hub repository id ('org/name')."
        )
    return hub_snapshot(expanded, allow_patterns, argument=argument)


def source_key(name_or_path: str | None) -> str | None:
    """How a local path or Hub id identifies loaded weights: local paths made absolute, Hub ids as they are."""
    if name_or_path is None:
        return None
    expanded = os.path.expanduser(str(name_or_path))
    return os.path.abspath(expanded) if os.path.exists(expanded) else str(name_or_path)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint of tensors safely: safetensors, or `torch.load(weights_only=True)` (memory-mapped).

    A `{"state_dict": ...}` wrapper (HPS, Lightning) is unwrapped and a DataParallel `module.` prefix removed.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(path, device="cpu")
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors.")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


# Loaded models shared between reward instances: the three VideoAlign rewards share one model, and a reward wrapped
# in `BinaryReward` next to its plain self loads once. Keyed on what was loaded, the device and the dtype.
_MODEL_CACHE: dict[tuple, Any] = {}
_MODEL_CACHE_LOCK = threading.RLock()


def cached_load(key: tuple, load: Callable[[], Any]) -> Any:
    """Return the object cached under `key`, calling `load()` once to create it."""
    with _MODEL_CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load()
        return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Forget all loaded reward models (frees their memory once no reward instance holds them)."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()


def split_qwen2_vl_reward_weights(weights: dict, keep_other_keys: bool) -> tuple[dict, dict]:
    """Split a Qwen2-VL reward model's weights (VideoAlign, HPSv3) into transformers' `Qwen2VLModel` state dict and
    the reward head's (`rm_head.*`), for checkpoints saved with transformers before and after 4.52; the language-model
    head is dropped. `keep_other_keys` keeps any other key in the backbone (its strict load then names it)."""
    backbone, head = {}, {}
    for key, value in weights.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.language_model.", "model.visual.")):
            backbone[key.removeprefix("model.")] = value
        elif key.startswith("model."):  # transformers < 4.52: the language model was `model`
            backbone["language_model." + key.removeprefix("model.")] = value
        elif key.startswith("visual.") or keep_other_keys:  # `visual.` in transformers < 4.52
            backbone[key] = value
    return backbone, head


def build_qwen2_vl_backbone(base_dir: str, backbone_weights: dict, device, dtype, checkpoint_name: str):
    """Transformers' `Qwen2VLModel` of the base config in `base_dir`, loaded with a reward checkpoint's backbone
    weights (VideoAlign, HPSv3), frozen and in eval mode; returns it and its text config.

    The embeddings take the checkpoint's vocabulary size (the tokenizer grew by the reward tokens). A checkpoint that
    does not fit the architecture is a `ValueError` naming `checkpoint_name` and the keys that differ.
    """
    from transformers import AutoConfig, Qwen2VLModel

    config = AutoConfig.from_pretrained(base_dir)
    text_config = getattr(config, "text_config", config)
    text_config.vocab_size = backbone_weights["language_model.embed_tokens.weight"].shape[0]
    with torch.device(device):  # built directly on the device, in its dtype; random weights are overwritten
        model = Qwen2VLModel._from_config(config, dtype=dtype, attn_implementation="sdpa")
    incompatible = model.load_state_dict(backbone_weights, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            f"The {checkpoint_name} checkpoint does not match the Qwen2-VL architecture of the base config "
            f"{base_dir!r}: missing {incompatible.missing_keys[:5]}, unexpected {incompatible.unexpected_keys[:5]}."
        )
    return model.eval().requires_grad_(False), text_config
