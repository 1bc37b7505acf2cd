"""Shared machinery of the model-based rewards: device and dtype, lazy loading, batching, input checks."""

import threading

import torch

from ._loading import cached_load
from ._preprocessing import check_images, check_prompts


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, `"bfloat16"` or `"bf16"` as a `torch.dtype` (`None` stays `None`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}.")


class ModelReward:
    r"""
    Base class of the rewards computed by a neural network.

    A subclass implements `_cache_key()` (what identifies the loaded weights), `_load(device, dtype)` (builds the
    model; called once, on first use) and `_score(loaded, prompts, images)` (scores one batch under `torch.no_grad()`,
    given what `_load` returned).
    The base class checks the inputs, splits them into batches of `batch_size`, and moves the model to its device and
    dtype.

    Device and dtype: given explicitly they are used as is. Left as `None`, the trainer's device and training dtype
    are used (the trainer calls [`~ModelReward.set_device`] once); used outside a trainer, a reward runs on CUDA when
    available, else on the CPU, in float32.

    Args:
        device (`str` or `torch.device`, *optional*):
            Device of the model. `None` follows the trainer.
        dtype (`torch.dtype` or `str`, *optional*):
            Dtype of the model (`torch.float32`, `torch.bfloat16`, `torch.float16` or their names). `None` follows the
            trainer.
        batch_size (`int`, *optional*, defaults to `16`):
            How many images go through the model at once: a memory knob that does not change the scores.
    """

    __name__ = "model_reward"
    #: Whether the reward compares images with their prompts (then one prompt per image is required).
    uses_prompts = True
    #: Whether the reward takes videos `(N, F, 3, H, W)` (else images `(N, 3, H, W)`).
    scores_videos = False

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = batch_size
        self._device = torch.device(device) if device is not None else None
        self._dtype = as_dtype(dtype)
        self._trainer_device = None
        self._trainer_dtype = None
        self._loaded = None
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        if self._device is not None:
            return self._device
        if self._trainer_device is not None:
            return self._trainer_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in."""
        return self._dtype or self._trainer_dtype or torch.float32

    def set_device(self, device: torch.device | str, dtype: torch.dtype | str | None = None) -> None:
        """Run on `device` in `dtype` unless they were given to the constructor. Called by the trainer; loads nothing."""
        self._trainer_device = torch.device(device)
        self._trainer_dtype = as_dtype(dtype)
        self._loaded = None  # picked up again (from the shared cache) on the next call

    def move_to(self, device: torch.device | str) -> None:
        """Move the loaded model to `device` without reloading it; later scoring runs there.

        Every torch module and tensor that `_load` returned (directly, or as a field of the object it returned) moves.
        A device given to the constructor always wins: then nothing moves. The trainer's `offload_reward_models`
        keeps rewards on the CPU and moves them to the GPU only to score.
        """
        if self._device is not None:
            return
        device = torch.device(device)
        _move_loaded(self.loaded, device)
        self._trainer_device = device

    def _cache_key(self) -> tuple:
        raise NotImplementedError

    def _load(self, device: torch.device, dtype: torch.dtype):
        raise NotImplementedError

    def _score(self, loaded, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def loaded(self):
        """What `_load` returned: the model and its helpers (loaded on first access, once, and shared by the rewards
        that load the same weights on the same device in the same dtype)."""
        with self._lock:
            if self._loaded is None:
                device, dtype = self.device, self.dtype
                key = (type(self).__name__, *self._cache_key(), str(device), str(dtype))
                self._loaded = cached_load(key, lambda: self._load(device, dtype))
            return self._loaded

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs) -> list[float]:
        images = check_images(images, self.__name__, allow_video=self.scores_videos, require_video=self.scores_videos)
        if self.uses_prompts:
            prompts = check_prompts(prompts, len(images), self.__name__)
        else:
            prompts = [""] * len(images) if prompts is None else list(prompts)
        if len(images) == 0:
            return []
        loaded = self.loaded
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                end = start + self.batch_size
                scores.append(self._score(loaded, prompts[start:end], images[start:end]).float().cpu())
        return torch.cat(scores).tolist()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, device={self.device}, dtype={self.dtype})"


def _move_loaded(loaded, device: torch.device) -> None:
    """Move, in place, the modules and tensors of what a reward's `_load` returned (a module or an object holding them)."""
    if isinstance(loaded, torch.nn.Module):
        loaded.to(device)
        return
    fields = loaded if isinstance(loaded, dict) else getattr(loaded, "__dict__", {})
    for name, value in list(fields.items()):
        if isinstance(value, torch.nn.Module):
            value.to(device)
        elif isinstance(value, torch.Tensor):
            fields[name] = value.to(device)
