"""The OCR reward (`ocr`): Flow-GRPO's text-rendering score, with RapidOCR's real PP-OCR models on the CPU."""

import importlib
import sys

import numpy as np
import pytest
import torch

from trl_dancegrpo.rewards import get_reward
from trl_dancegrpo.rewards.ocr import OCRReward, edit_distance, ocr_score, quoted_text


pytest.importorskip("rapidocr")


def render(text: str, size: int = 256) -> torch.Tensor:
    """Black text on a white image, drawn with PIL, as a float tensor (3, H, W) in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, size // 2 - 20), text, fill="black", font=ImageFont.load_default(size=32))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def reference_distance(a: str, b: str) -> int:
    """Levenshtein distance by the full recursion over prefixes (memoised), independent of the row-by-row version."""
    from functools import cache

    @cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_and_score():
    assert edit_distance("kitten", "sitting") == 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        b = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        assert edit_distance(a, b) == reference_distance(a, b), (a, b)
    assert quoted_text('a sign that says "Open Late" in neon') == "Open Late"
    assert quoted_text("no quotes here") is None
    assert quoted_text('one " quote') is None
    assert ocr_score("Open Late", "OPENLATE") == 1.0  # case and spaces ignored
    assert ocr_score("open", "the shop is open today") == 1.0  # the target inside longer text
    assert ocr_score("open", "opan") == pytest.approx(0.75)  # one substitution in four characters
    assert ocr_score("open", "") == 0.0
    assert ocr_score("ab", "xxxxxxxxxx") == 0.0  # clamped at 0, not negative


def test_ocr_reward_reads_rendered_text(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the OCR reward tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # the models ship in the wheel: nothing is downloaded
    reward = get_reward("ocr", num_threads=1)
    assert isinstance(reward, OCRReward)
    images = torch.stack([render("HELLO WORLD"), render("HELLO WORLD"), torch.ones(3, 256, 256), render("GOODBYE")])
    prompts = ['a poster saying "Hello World"', 'a poster saying "Quantum Zebra"', 'a sign "Hello World"', "no text"]
    scores = reward(prompts, images)  # one batch: the right text, another text, a blank image, no quoted text
    assert scores[0] >= 0.9
    assert scores[1] < 0.5
    assert scores[2] == pytest.approx(0.0, abs=0.05)
    assert scores[3] is None
    # one by one gives the same scores as the batch
    assert [reward(prompts[i : i + 1], images[i : i + 1])[0] for i in range(3)] == scores[:3]


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr", None)  # `import rapidocr` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "trl-dancegrpo\[ocr\]"'):
        get_reward("ocr")
    importlib.import_module("trl_dancegrpo.rewards.ocr")  # the module itself still imports


def test_missing_extra_on_the_command_line(monkeypatch, capsys, tmp_path):
    from trl_dancegrpo.evaluation import main

    monkeypatch.setitem(sys.modules, "rapidocr", None)
    argv = ["--model_name_or_path", "no-such-org/no-such-model", "--reward_funcs", "ocr"]
    assert main([*argv, "--output_dir", str(tmp_path)]) == 2  # refused before the (missing) model is looked up
    assert 'pip install "trl-dancegrpo[ocr]"' in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match="text_score"):
        OCRReward(text_score=2.0)
    with pytest.raises(ValueError, match="num_threads"):
        OCRReward(num_threads=0)
    with pytest.raises(ValueError, match="images"):
        OCRReward()(['"a"'], np.zeros((1, 8, 8, 3)))
