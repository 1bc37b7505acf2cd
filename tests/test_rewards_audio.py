"""Audio rewards: CLAP score on a tiny `ClapModel` written in the real repository's files and loaded through the Hub
path (offline cache) and by local path, against transformers' own computation; loudness against a float64 reference;
the audio keywords reaching only the rewards that take them."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from trl_dancegrpo.rewards import CLAPScoreReward, audio_loudness, clear_model_cache, get_reward, tiny
from trl_dancegrpo.rewards.audio import resample
from trl_dancegrpo.rewards.scoring import RewardScorer


PROMPTS = ["a dog barking", "rain on a roof", "a dog barking"]


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return tiny.save_tiny_clap_model(str(tmp_path_factory.mktemp("clap")))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An offline Hugging Face cache holding `files` for `repo_id`, as a download would leave them."""
    import shutil

    import huggingface_hub.constants

    cache_dir = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    clear_model_cache()

    def populate(repo_id: str, folder: str) -> None:
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        for name in os.listdir(folder):
            shutil.copy(os.path.join(folder, name), repo / "snapshots" / commit / name)

    yield populate
    clear_model_cache()


def waveforms(num: int, rate: int, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Stereo tracks `(num, 2, samples)`: tones of different pitch plus noise, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(rate * seconds)) / rate
    tones = torch.stack([0.3 * torch.sin(2 * math.pi * (220 + 110 * i) * t) for i in range(num)])
    return (tones[:, None] + 0.05 * torch.randn(num, 2, t.shape[0], generator=generator)).clamp(-1, 1)


def transformers_clap(folder: str, prompts: list[str], mono_48k: list) -> torch.Tensor:
    """CLAP's text-audio cosine computed directly with transformers (no resampling: the audio is at 48 kHz)."""
    from transformers import ClapModel, ClapProcessor

    model, processor = ClapModel.from_pretrained(folder).eval(), ClapProcessor.from_pretrained(folder)
    inputs = processor(
        text=prompts, audio=[a.numpy() for a in mono_48k], sampling_rate=48000, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        audio = model.get_audio_features(input_features=inputs["input_features"], is_longer=inputs["is_longer"])
    text, audio = (getattr(x, "pooler_output", x) for x in (text, audio))
    return F.cosine_similarity(text, audio, dim=-1)


def test_clap_score_matches_transformers_through_the_hub_path(clap_dir, offline_hub):
    offline_hub("laion/clap-htsat-unfused", clap_dir)
    audio = waveforms(3, 48000)
    scores = get_reward("clap_score", device="cpu")(PROMPTS, None, audio=audio, audio_sample_rate=48000)
    expected = transformers_clap(clap_dir, PROMPTS, list(audio.mean(dim=1)))
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-4, rtol=0)
    assert len({round(s, 6) for s in scores}) == 3  # the prompt and the sound both matter


def test_clap_score_resamples_and_takes_lists_of_tracks(clap_dir):
    audio = waveforms(3, 16000, seed=1)
    reward = CLAPScoreReward(clap_dir, device="cpu")
    at_16k = reward(PROMPTS, None, audio=audio, audio_sample_rate=16000)
    at_48k = reward(PROMPTS, None, audio=[resample(a.mean(0), 16000, 48000) for a in audio], audio_sample_rate=48000)
    assert at_16k == pytest.approx(at_48k, abs=1e-6)
    # batch size and order do not change a score
    batched = CLAPScoreReward(clap_dir, device="cpu", batch_size=1)(
        PROMPTS, None, audio=audio, audio_sample_rate=16000
    )
    assert batched == pytest.approx(at_16k, abs=1e-5)


def test_resample_keeps_a_tone(clap_dir):
    t16, t48 = torch.arange(16000) / 16000, torch.arange(48000) / 48000
    tone = torch.sin(2 * math.pi * 220 * t16.double())
    up = resample(tone.float(), 16000, 48000)
    assert up.shape == (48000,)
    expected = torch.sin(2 * math.pi * 220 * (t48.double() - 1 / 48000))  # linear interpolation's half-sample offset
    assert (up.double()[48:-48] - expected[48:-48]).abs().max() < 0.01
    assert torch.equal(resample(tone.float(), 16000, 16000), tone.float())


def test_audio_loudness_against_float64():
    samples = 4800
    square = torch.where(torch.arange(samples) % 20 < 10, 1.0, -1.0)
    sine = 0.5 * torch.sin(2 * math.pi * 440 * torch.arange(samples, dtype=torch.float64) / 48000)
    tracks = [square[None].expand(2, -1), sine[None].float(), torch.zeros(2, samples)]
    scores = audio_loudness(["a"] * 3, None, audio=tracks, audio_sample_rate=48000)
    reference = [0.0, 20 * math.log10(sine.pow(2).mean().sqrt().item()), -100.0]
    assert scores == pytest.approx(reference, abs=1e-4)
    assert reference[1] == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=1e-3)


def test_audio_reaches_only_the_rewards_that_take_it():
    seen = {}

    def image_only(prompts, images):
        return [0.0] * len(prompts)

    def named(prompts, images, audio, audio_sample_rate):
        seen["named"] = (tuple(audio.shape), audio_sample_rate)
        return [1.0] * len(prompts)

    def any_keywords(prompts, images, **kwargs):
        seen["kwargs"] = sorted(kwargs)
        return [2.0] * len(prompts)

    scorer = RewardScorer([image_only, named, any_keywords], ["image_only", "named", "any_keywords"])
    audio = torch.zeros(2, 2, 100)
    rewards, _ = scorer(["a", "b"], torch.zeros(2, 3, 8, 8), {"audio": audio, "audio_sample_rate": 24000})
    assert rewards.tolist() == [[0.0, 1.0, 2.0]] * 2
    assert seen == {"named": ((2, 2, 100), 24000), "kwargs": ["audio", "audio_sample_rate"]}


def test_wrappers_pass_the_audio_only_to_rewards_that_take_it():
    from trl_dancegrpo.rewards import BinaryReward, per_frame

    def image_only(prompts, images):  # no **kwargs: the wrappers (which take **kwargs) must not hand it the audio
        return [float(images.mean())] * len(prompts)

    scorer = RewardScorer([BinaryReward(image_only, threshold=0.5), per_frame(image_only)], ["binary", "per_frame"])
    videos = torch.ones(2, 3, 3, 8, 8)
    rewards, _ = scorer(["a", "b"], videos, {"audio": torch.zeros(2, 2, 100), "audio_sample_rate": 24000})
    assert rewards.tolist() == [[1.0, 1.0]] * 2


def test_audio_rewards_without_audio_are_a_clear_error(clap_dir):
    with pytest.raises(ValueError, match="'audio_loudness' scores audio.*LTX2Pipeline"):
        audio_loudness(["a"], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="'clap_score' scores audio"):
        CLAPScoreReward(clap_dir, device="cpu")(["a"], torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="2 audio tracks for 1 samples"):
        audio_loudness(["a"], None, audio=torch.zeros(2, 2, 10), audio_sample_rate=16000)
    with pytest.raises(ValueError, match="audio_sample_rate must be a positive integer"):
        audio_loudness(["a"], None, audio=torch.zeros(1, 2, 10), audio_sample_rate=16000.0)
