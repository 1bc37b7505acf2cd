"""The memory savers of DanceGRPOConfig: results stay identical, and the modules really move (or prompts are really
encoded once). Devices are checked by recording every `.to()` call: on a CPU-only machine the accelerator is the CPU."""

import pytest
import torch

from trl_dancegrpo.rewards._base import ModelReward

from .test_trainer import make_trainer


PROMPTS = ["a cat"] * 4 + ["a dog"] * 4


def record_moves(module, log: list, name: str) -> None:
    original = module.to

    def to(*args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)):
            log.append((name, str(torch.device(target))))
        return original(*args, **kwargs)

    module.to = to


def test_offload_text_encoders_moves_them_only_to_encode(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    plain = make_trainer(path, tmp_path / "plain")
    offloaded = make_trainer(path, tmp_path / "offloaded", offload_text_encoders=True)
    encoders = {n: m for n, m in offloaded.adapter.frozen_modules().items() if n.startswith("text_encoder")}
    assert sorted(encoders) == ["text_encoder", "text_encoder_2"]
    moves, where_at_forward = [], []
    for name, module in encoders.items():
        record_moves(module, moves, name)
        module.register_forward_pre_hook(lambda m, args, name=name: where_at_forward.append(moves[-1]))
    device = str(offloaded.accelerator.device)
    cond, _ = offloaded._conditioning(PROMPTS)
    # each encoder went to the accelerator before the encoding, ran there, and went back to the CPU after
    assert moves == [(n, device) for n in encoders] + [(n, "cpu") for n in encoders]
    assert all(target == device for _, target in where_at_forward) and len(where_at_forward) == 2
    reference, _ = plain._conditioning(PROMPTS)
    assert reference.keys() == cond.keys()
    for key in cond:
        torch.testing.assert_close(cond[key], reference[key], rtol=0, atol=0)
    # the VAE is needed to decode every rollout: it stays
    assert "vae" not in {name for name, _ in moves}


def test_cache_prompt_embeddings_encodes_each_prompt_once(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    plain = make_trainer(path, tmp_path / "plain")
    cached = make_trainer(path, tmp_path / "cached", cache_prompt_embeddings=True)
    calls = []
    encode = cached.adapter.encode_conditioning
    cached.adapter.encode_conditioning = lambda prompts, images=None: calls.append(list(prompts)) or encode(prompts)
    first, _ = cached._conditioning(PROMPTS)
    again, _ = cached._conditioning(PROMPTS)
    mixed, _ = cached._conditioning(["a tree"] * 4 + ["a cat"] * 4)
    assert calls == [["a cat", "a dog"], ["a tree"]]
    for got, prompts in ((first, PROMPTS), (again, PROMPTS), (mixed, ["a tree"] * 4 + ["a cat"] * 4)):
        reference, _ = plain._conditioning(prompts)
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=0, atol=0)
    assert all(value.device.type == "cpu" for row in cached._prompt_cache.values() for value in row.values())


class _RecordingLinear(torch.nn.Linear):
    def __init__(self, log):
        super().__init__(3, 1)
        self.log = log

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)):
            self.log.append(("to", str(torch.device(target))))
        return super().to(*args, **kwargs)


class TinyModelReward(ModelReward):
    """A reward computed by a tiny linear model on the mean colour, recording its moves and where it scored."""

    __name__ = "tiny_model_reward"

    def __init__(self, log, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def _cache_key(self):
        return (id(self),)

    def _load(self, device, dtype):
        torch.manual_seed(0)
        return _RecordingLinear(self.log).to(device=device, dtype=dtype)

    def _score(self, loaded, prompts, images):
        self.log.append(("score", str(self.device)))
        return loaded(images.float().mean(dim=(2, 3)).to(self.device, self.dtype)).squeeze(-1)


def test_offload_reward_models_moves_them_only_to_score(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    log, plain_log = [], []
    offloaded = make_trainer(path, tmp_path / "a", reward=TinyModelReward(log), offload_reward_models=True)
    plain = make_trainer(path, tmp_path / "b", reward=TinyModelReward(plain_log))
    images = torch.rand(4, 3, 32, 32)
    rows = [{"prompt": "a cat"}] * 4
    scores, _ = offloaded._score(["a cat"] * 4, images, rows)
    scores_again, _ = offloaded._score(["a cat"] * 4, images, rows)
    reference, _ = plain._score(["a cat"] * 4, images, rows)
    torch.testing.assert_close(scores, reference, rtol=0, atol=0)
    torch.testing.assert_close(scores_again, reference, rtol=0, atol=0)
    device = str(offloaded.accelerator.device)
    # loaded on the CPU, moved to the accelerator to score, back to the CPU after, each time
    moves = [entry for entry in log if entry[0] in ("to", "score")]
    assert moves[0] == ("to", "cpu")  # the load
    assert moves[1:] == [("to", device), ("score", device), ("to", "cpu")] * 2
    assert offloaded.reward_funcs[0].device.type == "cpu"


@pytest.mark.slow
def test_training_with_every_saver_gives_the_same_weights(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    savers = dict(offload_text_encoders=True, cache_prompt_embeddings=True, offload_reward_models=True)
    results = []
    for name, options in (("plain", {}), ("savers", savers)):
        trainer = make_trainer(path, tmp_path / name, reward=TinyModelReward([]), **options)
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hpsv2.1", "pickscore"])
def test_move_to_moves_every_module_of_a_real_model_reward(name, tmp_path):
    from trl_dancegrpo.rewards import CLIPScoreReward, HPSReward, PickScoreReward, tiny  # noqa: F401
    from trl_dancegrpo.rewards._loading import clear_model_cache

    clear_model_cache()
    if name == "hpsv2.1":
        checkpoint = tiny.save_tiny_hps_checkpoint(str(tmp_path / "HPS_v2.1_compressed.pt"))
        make = lambda: HPSReward(checkpoint_path=checkpoint, clip_model=tiny.register_tiny_open_clip_config())  # noqa: E731
    else:
        tiny.save_tiny_clip_model(str(tmp_path / "clip"), processor_path=str(tmp_path / "processor"))
        make = lambda: PickScoreReward(str(tmp_path / "clip"), str(tmp_path / "processor"))  # noqa: E731
    images = torch.rand(2, 3, 40, 40)
    reward = make()
    reward.set_device("cpu", torch.float32)
    before = reward(["a cat", "a dog"], images)
    reward.move_to("cpu")
    assert reward(["a cat", "a dog"], images) == before  # moving keeps the loaded model: same scores
    reward.move_to("meta")  # a device this machine has, to see everything move
    modules = [v for v in vars(reward.loaded).values() if isinstance(v, torch.nn.Module)]
    assert modules and all(p.device.type == "meta" for m in modules for p in m.parameters())
    assert reward.device.type == "meta"
    clear_model_cache()
