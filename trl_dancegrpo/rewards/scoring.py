"""Calling the reward functions of a batch: timeouts, retries of transient failures, and checks of what they return.

[`RewardScorer`] is what the trainer calls after each rollout (and for evaluation and the model card): every reward is
called with the prompts, the images and the other dataset columns (and, from pipelines that generate sound, `audio`
and `audio_sample_rate` where the reward takes them); `async def` rewards are awaited concurrently. Each
call may be limited in time (`reward_timeout`) and retried after a transient failure (`reward_retries`), and each
result is checked: one number (or `None`) per sample, as a list, a NumPy array or a tensor of shape `(N,)` or `(N, 1)`.
"""

import asyncio
import inspect
import math
import threading
import time

import torch
from transformers.utils import logging

from ._loading import RewardModelNotFoundError
from .wrappers import DECODED_KEYWORDS, keywords_for, takes  # noqa: F401  (importable from here, as before)


logger = logging.get_logger(__name__)

# Seconds before the first retry; doubled for each further one (capped at `MAX_RETRY_DELAY`).
RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0
# A reward that has returned only `None` for this many batches in a row, from the start of the run, is an error.
MAX_ALL_NONE_BATCHES = 10


class RewardTimeoutError(TimeoutError):
    """A reward function did not return within `reward_timeout` seconds."""


# Failures worth another try: a remote reward's connection dropped or timed out. Files that are missing stay missing,
# and a call that hit `reward_timeout` may still be running (a thread cannot be stopped), so neither is retried.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, OSError)
PERMANENT_ERRORS = (
    RewardTimeoutError,
    RewardModelNotFoundError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT_ERRORS) and not isinstance(error, PERMANENT_ERRORS)


class RewardScorer:
    """Scores batches with a list of reward functions.

    Args:
        funcs (`list[Callable]`): The reward functions `f(prompts, images, **columns)`.
        names (`list[str]`): Their names, used in metrics and messages.
        timeout (`float`, *optional*): Seconds each call may take (an `async` reward: until its result is awaited).
            `None`: no limit.
        retries (`int`, *optional*, defaults to `0`): How often a call that failed with a transient error
            (`ConnectionError`, `TimeoutError` raised by the reward itself, other `OSError`s) is repeated, waiting
            1, 2, 4... seconds in between.
    """

    def __init__(self, funcs: list, names: list[str], timeout: float | None = None, retries: int = 0):
        self.funcs, self.names = list(funcs), list(names)
        self.timeout, self.retries = timeout, retries
        self._all_none_batches = [0] * len(self.funcs)  # per reward; reset to -1 forever once it returned a value

    def __call__(self, prompts: list[str], images: torch.Tensor, columns: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards `[N, K]` (NaN for `None` and for NaN scores) and the `[N, K]` mask of the `None`s."""
        results, pending = [None] * len(self.funcs), {}
        for k in range(len(self.funcs)):
            result = self._call(k, prompts, images, columns)
            if inspect.isawaitable(result):
                pending[k] = result
            else:
                results[k] = result
        if pending:
            for k, result in zip(pending, asyncio.run(self._await_all(pending, prompts, images, columns))):
                results[k] = result
        rewards = torch.full((len(prompts), len(self.funcs)), float("nan"))
        not_applicable = torch.zeros_like(rewards, dtype=torch.bool)
        for k, result in enumerate(results):
            rewards[:, k], not_applicable[:, k] = validate_reward_output(self.names[k], result, prompts)
            self._check_applicable(k, not_applicable[:, k])
        return rewards, not_applicable

    # -- calling ------------------------------------------------------------------------------------------------------
    def _call(self, k: int, prompts, images, columns):
        """Call reward k (with its timeout and retries); an `async` reward's awaitable is returned un-awaited."""
        for attempt in range(self.retries + 1):
            try:
                return self._call_once(k, prompts, images, columns)
            except Exception as error:
                self._retry_or_raise(k, error, attempt)

    def _call_once(self, k: int, prompts, images, columns):
        func = self.funcs[k]
        columns = keywords_for(func, columns)  # the decoded extras (audio) only for the rewards that take them
        if self.timeout is None:
            return func(prompts, images, **columns)
        # A plain function cannot be interrupted: it runs in a daemon thread that is abandoned when it overruns (a
        # daemon thread does not keep the process alive at exit, as an executor's worker would).
        outcome = {}

        def target():
            try:
                outcome["result"] = func(prompts, images, **columns)
            except BaseException as error:  # handed to the caller's thread
                outcome["error"] = error

        thread = threading.Thread(target=target, name=f"reward-{self.names[k]}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise self._timeout_error(k)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    async def _await_all(self, pending: dict, prompts, images, columns) -> list:
        calls = [self._await_one(k, awaitable, prompts, images, columns) for k, awaitable in pending.items()]
        return await asyncio.gather(*calls)

    async def _await_one(self, k: int, awaitable, prompts, images, columns):
        """Await reward k's result (with its timeout), calling it again after a transient failure."""
        for attempt in range(self.retries + 1):
            try:
                if attempt > 0:
                    awaitable = self._call_once(k, prompts, images, columns)
                    if not inspect.isawaitable(awaitable):
                        return awaitable
                task = asyncio.ensure_future(awaitable)
                # `asyncio.wait` (not `wait_for`): a TimeoutError the reward raises itself is not taken for ours
                done, _ = await asyncio.wait({task}, timeout=self.timeout)
                if not done:
                    task.cancel()
                    raise self._timeout_error(k)
                return task.result()
            except Exception as error:
                await asyncio.sleep(self._retry_or_raise(k, error, attempt, sleep=False))

    def _retry_or_raise(self, k: int, error: Exception, attempt: int, sleep: bool = True) -> float:
        """Log and wait before the next try of a transient failure (returns the delay); raise anything else."""
        name = self.names[k]
        if isinstance(error, RewardTimeoutError):
            raise error
        if not is_transient(error) or attempt >= self.retries:
            tries = f" (after {attempt + 1} tries)" if attempt else ""
            hint = (
                "" if self.retries or not is_transient(error) else " Set reward_retries to retry transient failures."
            )
            raise RuntimeError(
                f"The reward function {name!r} raised {type(error).__name__}{tries}: {error}.{hint}"
            ) from error
        delay = min(RETRY_DELAY * 2**attempt, MAX_RETRY_DELAY)
        logger.warning(
            f"The reward function {name!r} raised {type(error).__name__}: {error}; retry {attempt + 1} of "
            f"{self.retries} in {delay:g} s."
        )
        if sleep:
            time.sleep(delay)
        return delay

    def _timeout_error(self, k: int) -> RewardTimeoutError:
        return RewardTimeoutError(
            f"The reward function {self.names[k]!r} did not return within reward_timeout={self.timeout:g} s. Raise "
            "reward_timeout if it is just slow, or check the reward (a remote service that does not answer?)."
        )

    # -- results ------------------------------------------------------------------------------------------------------
    def _check_applicable(self, k: int, not_applicable: torch.Tensor) -> None:
        """Warn about a batch in which reward k applied to no sample; an error if it never applied to any so far."""
        if len(not_applicable) == 0 or not bool(not_applicable.all()):
            self._all_none_batches[k] = -1
            return
        name = self.names[k]
        logger.warning(
            f"The reward function {name!r} returned None for all {len(not_applicable)} samples of the batch: it "
            "gives no training signal for this batch."
        )
        if self._all_none_batches[k] < 0:
            return
        self._all_none_batches[k] += 1
        if self._all_none_batches[k] >= MAX_ALL_NONE_BATCHES:
            raise ValueError(
                f"The reward function {name!r} has returned None for every sample of its first "
                f"{self._all_none_batches[k]} batches: it does not apply to these prompts, so it trains nothing. "
                "None means 'not applicable'; return a number for the samples it scores."
            )


def validate_reward_output(name: str, result, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of one reward as a float32 tensor `[N]` (NaN for `None`) and the mask of the `None`s.

    Accepts a list or tuple of numbers and `None`s, or a NumPy array / tensor of shape `(N,)` or `(N, 1)`; anything
    else (a dict, a string, a scalar, another shape, a wrong length, an infinite score) is an error naming the reward.
    """
    num = len(prompts)
    if isinstance(result, (dict, str, bytes)) or result is None:
        what = "None" if result is None else type(result).__name__
        raise TypeError(
            f"The reward function {name!r} returned {what}; it must return one number (or None) per sample: a list of "
            f"{num} floats, or an array / tensor of shape ({num},)."
        )
    if isinstance(result, torch.Tensor) or hasattr(result, "__array__") and hasattr(result, "shape"):
        shape = tuple(result.shape)
        if len(shape) == 2 and shape[1] == 1:
            result = result[:, 0]
        elif len(shape) != 1:
            raise ValueError(
                f"The reward function {name!r} returned an array of shape {shape}; expected ({num},) or ({num}, 1)."
            )
        if isinstance(result, torch.Tensor):
            result = result.detach().float().cpu()
        result = result.tolist()
    try:
        result = list(result)
    except TypeError:
        raise TypeError(
            f"The reward function {name!r} must return a list of floats (or None), got {type(result).__name__}."
        ) from None
    if len(result) != num:
        raise ValueError(
            f"The reward function {name!r} returned {len(result)} values for {num} samples; it must "
            "return one value (or None) per sample."
        )
    values, none = [], [value is None for value in result]
    for i, value in enumerate(result):
        if value is None:
            values.append(float("nan"))
            continue
        if isinstance(value, (str, bytes, dict, list, tuple)):
            raise TypeError(
                f"The reward function {name!r} returned {value!r} for sample {i}; expected a number or None."
            )
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"The reward function {name!r} returned {value!r} for sample {i}; expected a number or None."
            ) from None
        if math.isinf(value):
            raise ValueError(
                f"The reward function {name!r} returned {value} for sample {i} (prompt {prompts[i]!r}); rewards "
                "must be finite. Return None for samples the reward does not apply to."
            )
        values.append(value)
    return torch.tensor(values, dtype=torch.float32), torch.tensor(none, dtype=torch.bool)


def resolve_reward_funcs(reward_funcs, reward_kwargs: dict | None = None) -> tuple[list, list[str]]:
    """The reward callables and their names; strings are built with `get_reward(name, **reward_kwargs[name])`.

    Everything a run will need from its rewards is checked here, before any model loads: unknown names (with the
    registered names that come close), `reward_kwargs` entries for rewards that are not in `reward_funcs`, and
    (for rewards with a `check_weights()` method) whether their weights are available, and (for rewards with a
    `check_server()` method: the VLM judges) whether their server answers and serves their model.
    """
    from ._loading import RewardModelNotFoundError
    from .registry import check_reward_kwargs_names, check_reward_name, get_reward

    if not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: pass at least one reward function or registry name.")
    reward_kwargs = dict(reward_kwargs or {})
    check_reward_kwargs_names(reward_funcs, reward_kwargs)
    funcs, names = [], []
    for func in reward_funcs:
        if isinstance(func, str):
            kwargs = reward_kwargs.get(func, {})
            check_reward_name(func)
            try:
                built = get_reward(func, **kwargs)
            except TypeError as error:
                raise ValueError(f"The reward {func!r} does not take the reward_kwargs {kwargs}: {error}") from None
            if hasattr(built, "check_weights"):
                try:
                    built.check_weights()
                except RewardModelNotFoundError as error:
                    raise RewardModelNotFoundError(f"{error} {_local_path_hint(func, str(error))}") from None
            if hasattr(built, "check_server"):  # a VLM judge: its server answers and serves its model
                built.check_server()
            funcs.append(built)
            names.append(func)
        elif callable(func):
            if hasattr(func, "check_weights"):  # a reward object built in Python (or a wrapper around one)
                func.check_weights()
            if hasattr(func, "check_server"):
                func.check_server()
            funcs.append(func)
            names.append(getattr(func, "__name__", None) or type(func).__name__)
        else:
            raise TypeError(f"Each reward function must be a callable or a registry name, got {type(func).__name__}.")
    return funcs, names


def _local_path_hint(name: str, message: str) -> str:
    import re

    found = re.search(r"`(\w+)=\.\.\.`", message)
    argument = found.group(1) if found else "checkpoint_path"
    return (
        f"With the trainer, give it through reward_kwargs: on the command line "
        f'`--reward_kwargs \'{{"{name}": {{"{argument}": "/path/to/file"}}}}\'`, in a YAML recipe '
        f'`reward_kwargs: {{"{name}": {{{argument}: /path/to/file}}}}`, in Python '
        f'`DanceGRPOConfig(reward_kwargs={{"{name}": {{"{argument}": "/path/to/file"}}}})`.'
    )
