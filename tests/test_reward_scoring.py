"""What rewards return and how they fail: output checks, rewards that apply to nothing, timeouts and retries."""

import asyncio
import logging
import threading
import time

import numpy as np
import pytest
import torch

from trl_dancegrpo.rewards import scoring
from trl_dancegrpo.rewards.scoring import RewardScorer, RewardTimeoutError, validate_reward_output

from .test_trainer import make_trainer


PROMPTS = ["a", "b", "c"]
IMAGES = torch.zeros(3, 3, 8, 8)


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(scoring, "RETRY_DELAY", 0.0)


@pytest.fixture
def warnings_logged(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING, logger="trl_dancegrpo")
    yield caplog
    hf_logging.disable_propagation()


# -- what a reward returns --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "output",
    [
        [0.1, 0.2, 0.3],
        (0.1, 0.2, 0.3),
        np.array([0.1, 0.2, 0.3]),
        np.array([[0.1], [0.2], [0.3]]),
        torch.tensor([0.1, 0.2, 0.3]),
        torch.tensor([[0.1], [0.2], [0.3]]),
        [np.float32(0.1), torch.tensor(0.2), 0.3],
    ],
    ids=["list", "tuple", "numpy", "numpy-N1", "torch", "torch-N1", "scalars"],
)
def test_lists_arrays_and_tensors_of_n_or_n1_are_accepted(output):
    values, none = validate_reward_output("r", output, PROMPTS)
    assert torch.allclose(values, torch.tensor([0.1, 0.2, 0.3]))
    assert not none.any()


@pytest.mark.parametrize(
    "output, error, message",
    [
        ({"a": 1.0, "b": 2.0, "c": 3.0}, TypeError, "'r' returned dict; it must return one number"),
        ("abc", TypeError, "'r' returned str"),
        (None, TypeError, "'r' returned None"),
        (0.5, TypeError, "must return a list of floats"),
        (np.zeros((3, 2)), ValueError, r"shape \(3, 2\); expected \(3,\) or \(3, 1\)"),
        (torch.zeros(3, 1, 1), ValueError, r"shape \(3, 1, 1\)"),
        ([0.1, 0.2], ValueError, "returned 2 values for 3 samples"),
        ([0.1, "x", 0.3], TypeError, "returned 'x' for sample 1"),
        ([0.1, [0.2], 0.3], TypeError, r"returned \[0.2\] for sample 1"),
        ([0.1, float("inf"), 0.3], ValueError, "must be finite"),
    ],
)
def test_other_outputs_are_clear_errors(output, error, message):
    with pytest.raises(error, match=message):
        validate_reward_output("r", output, PROMPTS)


def test_a_reward_that_applies_to_no_sample_warns_then_fails(warnings_logged):
    scorer = RewardScorer([lambda prompts, images: [None] * len(prompts)], ["nothing"])
    for _ in range(scoring.MAX_ALL_NONE_BATCHES - 1):
        rewards, none = scorer(PROMPTS, IMAGES, {})
        assert none.all() and torch.isnan(rewards).all()
    assert warnings_logged.text.count("'nothing' returned None for all 3 samples") == scoring.MAX_ALL_NONE_BATCHES - 1
    with pytest.raises(ValueError, match="'nothing' has returned None for every sample of its first 10 batches"):
        scorer(PROMPTS, IMAGES, {})


def test_a_reward_that_applied_once_only_warns():
    calls = iter([[1.0, None, 2.0]] + [[None] * 3] * 20)
    scorer = RewardScorer([lambda prompts, images: next(calls)], ["sometimes"])
    for _ in range(15):
        scorer(PROMPTS, IMAGES, {})  # no error: it does apply to some prompts


def test_all_none_batch_logs_no_zero_reward(tiny_pipeline_path, tmp_path):
    def never(prompts, images, **kwargs):
        return [None] * len(prompts)

    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward=never, max_steps=1)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert "reward" not in logs  # not a misleading 0.0
    assert logs["advantages/abs_mean"] == 0


# -- timeouts ---------------------------------------------------------------------------------------------------------
def hanging(prompts, images, **kwargs):
    time.sleep(30)
    return [1.0] * len(prompts)


async def hanging_async(prompts, images, **kwargs):
    await asyncio.sleep(30)
    return [1.0] * len(prompts)


@pytest.mark.parametrize("func", [hanging, hanging_async], ids=["plain", "async"])
def test_a_reward_that_does_not_return_in_time(func):
    scorer = RewardScorer([func], ["slow_judge"], timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(RewardTimeoutError, match="'slow_judge' did not return within reward_timeout=0.5 s"):
        scorer(PROMPTS, IMAGES, {})
    assert time.perf_counter() - start < 5


def test_a_reward_that_raises_timeout_itself_is_not_taken_for_ours():
    async def refuses(prompts, images, **kwargs):
        raise TimeoutError("upstream timed out")

    with pytest.raises(RuntimeError, match="'remote' raised TimeoutError: upstream timed out"):
        RewardScorer([refuses], ["remote"], timeout=5)(PROMPTS, IMAGES, {})


@pytest.mark.slow
def test_overlap_rewards_respects_the_timeout(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        reward=hanging,
        overlap_rewards=True,
        rollout_batch_size=4,
        reward_timeout=1.0,
        max_steps=1,
    )
    start = time.perf_counter()
    with pytest.raises(RewardTimeoutError, match="'hanging' did not return within reward_timeout=1 s"):
        trainer.train()
    assert time.perf_counter() - start < 20
    assert any(t.name == "reward-hanging" for t in threading.enumerate())  # abandoned, a daemon: exit is not blocked


# -- retries ----------------------------------------------------------------------------------------------------------
class Flaky:
    """Fails with `error` the first `failures` calls."""

    def __init__(self, failures, error=None, is_async=False):
        self.failures, self.calls = failures, 0
        self.error = error if error is not None else ConnectionError("connection reset")
        self.__name__ = "remote"
        self.is_async = is_async

    def __call__(self, prompts, images, **kwargs):
        self.calls += 1
        if self.is_async:
            return self._async(prompts)
        if self.calls <= self.failures:
            raise self.error
        return [0.5] * len(prompts)

    async def _async(self, prompts):
        if self.calls <= self.failures:
            raise self.error
        return [0.5] * len(prompts)


@pytest.mark.parametrize("is_async", [False, True], ids=["plain", "async"])
def test_transient_failures_are_retried_and_logged(is_async, warnings_logged):
    flaky = Flaky(2, is_async=is_async)
    rewards, _ = RewardScorer([flaky], ["remote"], retries=2)(PROMPTS, IMAGES, {})
    assert flaky.calls == 3 and torch.equal(rewards[:, 0], torch.full((3,), 0.5))
    assert "retry 1 of 2" in warnings_logged.text and "retry 2 of 2" in warnings_logged.text


@pytest.mark.parametrize("is_async", [False, True], ids=["plain", "async"])
def test_retries_run_out(is_async):
    flaky = Flaky(5, is_async=is_async)
    with pytest.raises(RuntimeError, match=r"'remote' raised ConnectionError \(after 2 tries\): connection reset"):
        RewardScorer([flaky], ["remote"], retries=1)(PROMPTS, IMAGES, {})
    assert flaky.calls == 2


def test_without_retries_the_error_suggests_them():
    with pytest.raises(RuntimeError, match="Set reward_retries to retry transient failures"):
        RewardScorer([Flaky(1)], ["remote"])(PROMPTS, IMAGES, {})


def test_a_bug_is_not_retried():
    flaky = Flaky(5, error=ValueError("bad input"))
    with pytest.raises(RuntimeError, match="'remote' raised ValueError: bad input"):
        RewardScorer([flaky], ["remote"], retries=3)(PROMPTS, IMAGES, {})
    assert flaky.calls == 1


def test_the_config_passes_timeout_and_retries_to_the_trainer(tiny_pipeline_path, tmp_path):
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, reward_timeout=12.5, reward_retries=3)
    assert (trainer.reward_scorer.timeout, trainer.reward_scorer.retries) == (12.5, 3)


@pytest.mark.parametrize(
    "name", ["hpsv2.1", "clip_score", "pickscore", "aesthetic", "videoalign_mq", "hpsv3", "imagereward"]
)
def test_model_rewards_without_their_weights_fail_when_built(name, tmp_path, monkeypatch):
    """Offline with an empty cache: the error comes from `resolve_reward_funcs` (before any pipeline loads)."""
    from huggingface_hub import constants

    from trl_dancegrpo.rewards import RewardModelNotFoundError
    from trl_dancegrpo.rewards.scoring import resolve_reward_funcs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RewardModelNotFoundError, match=f'--reward_kwargs \'{{"{name}": {{"'):
        resolve_reward_funcs([name])


@pytest.mark.parametrize("wrap", ["object", "binary", "per_frame"])
def test_reward_objects_and_wrapped_rewards_without_weights_fail_when_built(wrap, tmp_path, monkeypatch):
    """A model reward built in Python, or wrapped, is checked like a registry name: before any pipeline loads."""
    from huggingface_hub import constants

    from trl_dancegrpo.rewards import BinaryReward, HPSReward, RewardModelNotFoundError, per_frame
    from trl_dancegrpo.rewards.scoring import resolve_reward_funcs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    reward = HPSReward(version="v2.1")
    reward = {"object": reward, "binary": BinaryReward(reward, threshold=0.3), "per_frame": per_frame(reward)}[wrap]
    with pytest.raises(RewardModelNotFoundError):
        resolve_reward_funcs([reward])
