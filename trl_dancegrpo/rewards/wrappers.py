"""Rewards built from other rewards: thresholded (binary) rewards, and image rewards applied to every video frame.

Both wrappers accept any reward: a plain function, a reward class, a registry name, or an `async def` reward (then
calling the wrapper returns an awaitable, which the trainer awaits like any async reward). They forward
`set_device` to the wrapped reward, so model rewards inside them still follow the trainer's device and dtype.
"""

import inspect
from collections.abc import Callable

import torch


# What pipelines decode besides the images (LTX-2's sound track): passed only to the rewards whose signature names them
# or takes `**kwargs`, so that image rewards written without `**kwargs` keep working with such pipelines.
DECODED_KEYWORDS = ("audio", "audio_sample_rate")


def takes(func, keyword: str) -> bool:
    """Whether calling `func` with the keyword argument `keyword` is allowed (named, or `**kwargs`)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): pass it along
        return True
    return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def keywords_for(func, columns: dict) -> dict:
    """`columns` without the decoded extras (`DECODED_KEYWORDS`) that `func` does not take."""
    return {key: value for key, value in columns.items() if key not in DECODED_KEYWORDS or takes(func, key)}


def reward_name(reward) -> str:
    """The name a reward is logged under: its `__name__`, else its class name."""
    return getattr(reward, "__name__", None) or type(reward).__name__


def _then(result, post_process: Callable):
    """Apply `post_process` to a reward's result, or after awaiting it when the reward is asynchronous."""
    if inspect.isawaitable(result):

        async def awaited():
            return post_process(await result)

        return awaited()
    return post_process(result)


class _RewardWrapper:
    def __init__(self, reward, name: str | None = None):
        if isinstance(reward, str):
            from .registry import get_reward

            reward = get_reward(reward)
        if not callable(reward):
            raise ValueError(f"reward must be a callable or a registered reward name, got {type(reward).__name__}.")
        self.reward = reward
        self.__name__ = name or self._default_name(reward_name(reward))

    def _default_name(self, inner: str) -> str:
        raise NotImplementedError

    def set_device(self, device, dtype=None) -> None:
        """Forward the trainer's device and dtype to the wrapped reward (if it has a `set_device`)."""
        if hasattr(self.reward, "set_device"):
            self.reward.set_device(device, dtype)

    def check_weights(self) -> None:
        """Check that the wrapped reward's weights are available (the trainer asks before any model loads)."""
        if hasattr(self.reward, "check_weights"):
            self.reward.check_weights()

    def check_server(self) -> None:
        """Check that the wrapped reward's server is up (a VLM judge), if it has one."""
        if hasattr(self.reward, "check_server"):
            self.reward.check_server()

    def move_to(self, device) -> None:
        """Move the wrapped reward's loaded model (`offload_reward_models`), if it has one."""
        if hasattr(self.reward, "move_to"):
            self.reward.move_to(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reward!r}, name={self.__name__!r})"


class BinaryReward(_RewardWrapper):
    r"""
    A reward thresholded to 0 or 1: 1.0 where the wrapped reward is above `threshold`, else 0.0 (DanceGRPO's binary
    reward). Samples the wrapped reward scores `None` stay `None`.

    Args:
        reward (`Callable` or `str`):
            The reward to threshold, or its registry name (e.g. `"hpsv2.1"`).
        threshold (`float`):
            Scores strictly above it give 1.0.
        name (`str`, *optional*):
            Name to log the reward under. Defaults to `"<wrapped name>_binary"`.

    Example:

    ```python
    >>> from trl_dancegrpo.rewards import BinaryReward, HPSReward
    >>> reward = BinaryReward(HPSReward(), threshold=0.28)
    ```
    """

    def __init__(self, reward, threshold: float, name: str | None = None):
        super().__init__(reward, name)
        self.threshold = float(threshold)

    def _default_name(self, inner: str) -> str:
        return f"{inner}_binary"

    def _binarize(self, scores) -> list[float | None]:
        return [None if score is None else float(score > self.threshold) for score in scores]

    def __call__(self, prompts, images, **kwargs):
        # a wrapper takes **kwargs: the decoded extras (audio) reach the wrapped reward only if it takes them
        return _then(self.reward(prompts, images, **keywords_for(self.reward, kwargs)), self._binarize)


class PerFrameReward(_RewardWrapper):
    r"""
    Scores videos with an image reward: every frame is scored with the video's prompt (and dataset columns), and the
    video's reward is the mean over its frames (frames scored `None` are skipped; all `None` gives `None`).

    A batch of videos `(N, F, 3, H, W)` is handed to the wrapped reward as `N * F` images in one call (the wrapped
    reward batches them by its own `batch_size`); a batch of images `(N, 3, H, W)` passes through unchanged.

    Args:
        reward (`Callable` or `str`):
            The image reward, or its registry name (e.g. `"aesthetic"`).
        name (`str`, *optional*):
            Name to log the reward under. Defaults to the wrapped reward's name.

    Example:

    ```python
    >>> from trl_dancegrpo.rewards import per_frame
    >>> video_aesthetic = per_frame("aesthetic")
    ```
    """

    def _default_name(self, inner: str) -> str:
        return inner

    def __call__(self, prompts, images, **kwargs):
        kwargs = keywords_for(self.reward, kwargs)  # the decoded extras (audio) only if the wrapped reward takes them
        if not isinstance(images, torch.Tensor) or images.ndim != 5:
            return self.reward(prompts, images, **kwargs)
        num_videos, num_frames = images.shape[:2]
        if prompts is not None and len(prompts) != num_videos:
            raise ValueError(
                f"{self.__name__}: got {len(prompts)} prompts for {num_videos} videos; pass one per video."
            )
        frames = images.flatten(0, 1)
        frame_prompts = None if prompts is None else [prompt for prompt in prompts for _ in range(num_frames)]
        frame_kwargs = {key: self._repeat(value, num_videos, num_frames) for key, value in kwargs.items()}

        def mean_per_video(scores) -> list[float | None]:
            means = []
            for video in range(num_videos):
                values = [s for s in scores[video * num_frames : (video + 1) * num_frames] if s is not None]
                means.append(sum(values) / len(values) if values else None)
            return means

        return _then(self.reward(frame_prompts, frames, **frame_kwargs), mean_per_video)

    @staticmethod
    def _repeat(value, num_videos: int, num_frames: int):
        # Per-sample dataset columns (lists or tensors of length N) are repeated for each frame; anything else is
        # passed as is.
        if isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == num_videos:
            return value.repeat_interleave(num_frames, dim=0)
        if isinstance(value, (list, tuple)) and len(value) == num_videos:
            return [item for item in value for _ in range(num_frames)]
        return value


def per_frame(reward, name: str | None = None) -> PerFrameReward:
    """Score videos with the image reward `reward`, frame by frame, averaged per video. See [`PerFrameReward`]."""
    return PerFrameReward(reward, name=name)
