"""The EMA of the policy (`ema_decay`): the update against a float64 reference, the start step, exact resume, the
saved `ema/` loaded by diffusers, evaluation with it, and the options' checks. Two processes: test_distributed.py."""

import shutil

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_dancegrpo import DanceGRPOConfig
from trl_dancegrpo.ema import PolicyEMA

from .test_resume import StopAt, assert_resume_continues_exactly
from .test_trainer import IMAGE_CALL, lora_config, make_config, make_trainer


class RecordWeights(TrainerCallback):
    """The trained weights (float64) at the start and after every optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, {}

    def _record(self, step):
        named = self.trainer.denoiser.named_parameters()
        self.weights[step] = {n: p.detach().double().clone() for n, p in named if p.requires_grad}

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


def reference_ema(weights: dict, decay: float, start: int, last: int) -> dict:
    """The EMA in float64, written from its definition: a copy at `start`, then d * ema + (1 - d) * w per step."""
    ema = {n: w.clone() for n, w in weights[start].items()}
    for step in range(start + 1, last + 1):
        ema = {n: decay * ema[n] + (1 - decay) * weights[step][n] for n in ema}
    return ema


def assert_ema_equals(trainer, expected: dict) -> None:
    shadow = trainer.ema.shadow
    assert shadow.keys() == expected.keys()
    for name, value in expected.items():
        assert shadow[name].dtype == torch.float32
        torch.testing.assert_close(shadow[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("start", [0, 2], ids=["from-the-start", "ema_start_step=2"])
def test_ema_follows_the_float64_reference(start, tiny_pipeline_path, tmp_path):
    decay = 0.6
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        peft_config=lora_config(),
        max_steps=4,
        learning_rate=5e-2,
        ema_decay=decay,
        ema_start_step=start,
        log_samples=False,
    )
    recorder = RecordWeights(trainer)
    trainer.add_callback(recorder)
    trainer.add_callback(StopAt(1))
    trainer.train()
    if start == 2:  # one step done, the EMA has not started yet
        assert not trainer.ema.started and trainer.ema.shadow is None
    else:
        assert_ema_equals(trainer, reference_ema(recorder.weights, decay, 0, 1))

    trainer.remove_callback(StopAt)
    trainer.args.max_steps = 4
    recorder.weights.clear()
    # go on from the weights reached, starting the EMA afresh (a new `train()` without resuming)
    trainer.train()
    weights = recorder.weights
    assert set(weights) == {0, 1, 2, 3, 4}
    assert_ema_equals(trainer, reference_ema(weights, decay, start, 4))
    # only the trained parameters (the LoRA's) are averaged, and they moved: the EMA is not the weights
    assert all("lora_" in name for name in trainer.ema.shadow)
    assert any(not torch.equal(trainer.ema.shadow[n].double(), weights[4][n]) for n in trainer.ema.shadow)


def test_ema_update_on_a_bfloat16_parameter_keeps_float32():
    # the weights may be bf16 (cast for training): the EMA is float32, so small updates are not rounded away
    param = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    ema = PolicyEMA({"w": param}, decay=0.999)
    ema.start()
    reference = torch.full((4,), 1.0, dtype=torch.float64)
    for value in (1.5, 2.0, 0.5):
        with torch.no_grad():
            param.fill_(value)
        ema.update()
        reference = 0.999 * reference + 0.001 * value
    assert ema.shadow["w"].dtype == torch.float32
    torch.testing.assert_close(ema.shadow["w"].double(), reference, rtol=1e-6, atol=0)
    with torch.no_grad():
        param.fill_(3.0)
    with ema.applied():  # inside: the EMA (cast to the weight's dtype); after: the weight, exactly
        assert torch.equal(param.data, ema.shadow["w"].to(torch.bfloat16))
    assert torch.equal(param.data, torch.full((4,), 3.0, dtype=torch.bfloat16))


@pytest.mark.slow  # with LoRA; full fine-tuning: test_distributed's FSDP resume (full and LoRA)
def test_ema_resumes_exactly(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    settings = dict(
        max_steps=4,
        learning_rate=1e-2,
        save_steps=2,
        save_strategy="steps",
        ema_decay=0.7,
        ema_start_step=1,
        ema_on_cpu=True,
        log_samples=False,
    )
    straight, _, second = assert_resume_continues_exactly(
        lambda out: make_trainer(path, out, peft_config=lora_config(), **settings), tmp_path
    )
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    assert (checkpoint / "ema_state.safetensors").is_file()
    assert (checkpoint / "ema").is_dir()  # each checkpoint also holds the EMA as loadable weights
    assert second.ema.num_updates == straight.ema.num_updates == 3
    for name, value in straight.ema.shadow.items():
        assert second.ema.shadow[name].device.type == "cpu"
        assert torch.equal(second.ema.shadow[name], value), name


def test_resume_with_another_decay_is_refused(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    settings = dict(max_steps=1, save_steps=1, save_strategy="steps", log_samples=False, peft_config=lora_config())
    make_trainer(path, tmp_path, ema_decay=0.9, **settings).train()
    resumed = make_trainer(path, tmp_path, ema_decay=0.99, **{**settings, "max_steps": 2})
    with pytest.raises(ValueError, match="ema_decay 0.9, this run has 0.99"):
        resumed.train(resume_from_checkpoint=True)


def hub_cache(folder, repo_id: str, cache) -> str:
    """`folder` as a Hub model in the cache layout, so that diffusers resolves `repo_id` (offline) as on the Hub."""
    sha = "b" * 40
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    return str(cache)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_saved_ema_loads_with_diffusers_and_differs_from_the_weights(
    use_lora, tiny_pipeline_path, tmp_path, monkeypatch
):
    path = tiny_pipeline_path("tiny-flux")
    trainer = make_trainer(
        path,
        tmp_path,
        peft_config=lora_config() if use_lora else None,
        max_steps=2,
        learning_rate=5e-2,
        ema_decay=0.5,
        log_samples=False,
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    card = (out / "README.md").read_text()
    assert "### EMA weights" in card and "decay 0.5" in card
    # loaded as the card says, from a Hub repository (its cache layout, offline) and from the local folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = hub_cache(out, "user/tuned", tmp_path / "cache")
    if use_lora:
        name = "pytorch_lora_weights.safetensors"
        assert f'weight_name="ema/{name}"' in card
        assert f'weight_name="{name}")' in card  # the main weights named: on the Hub `ema/` would be listed first
        raw, ema = load_file(out / name), load_file(out / "ema" / name)
        assert raw.keys() == ema.keys() and len(ema) == len(trainer.ema.shadow)  # every LoRA tensor
        assert any(not torch.equal(raw[key], ema[key]) for key in raw)
        images = {}
        for label, source, extra in (
            ("raw", "user/tuned", {"weight_name": name}),  # (offline, diffusers cannot list the files)
            ("ema", "user/tuned", {"weight_name": f"ema/{name}"}),
            ("ema-local", str(out), {"weight_name": f"ema/{name}"}),
        ):
            pipe = DiffusionPipeline.from_pretrained(path)
            pipe.load_lora_weights(source, cache_dir=cache, **extra)
            images[label] = pipe(**IMAGE_CALL, generator=torch.Generator().manual_seed(0)).images
            assert torch.isfinite(images[label]).all()
        assert not torch.equal(images["raw"], images["ema"])
        assert torch.equal(images["ema"], images["ema-local"])
    else:
        assert 'subfolder="ema"' in card
        raw = FluxTransformer2DModel.from_pretrained("user/tuned", cache_dir=cache).state_dict()
        ema = FluxTransformer2DModel.from_pretrained("user/tuned", subfolder="ema", cache_dir=cache).state_dict()
        local = FluxTransformer2DModel.from_pretrained(out / "ema").state_dict()
        assert raw.keys() == ema.keys() == local.keys()
        moved = [key for key in raw if not torch.equal(raw[key], ema[key])]
        assert moved
        shadow = trainer.ema.shadow
        for key in moved:
            torch.testing.assert_close(ema[key], shadow[key].to(ema[key].dtype), rtol=0, atol=0, msg=key)
            assert torch.equal(local[key], ema[key])
    # the trained weights are back in the model after the EMA was saved
    for name, param in trainer.denoiser.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach().float(), trainer.ema.shadow[name]), name


def test_evaluation_uses_the_ema_with_eval_with_ema(tiny_pipeline_path, tmp_path):
    from datasets import Dataset

    from trl_dancegrpo.rewards import brightness

    probe = {"seen": []}

    def spy(prompts, images, **kwargs):  # a reward that looks at the model while it is scored
        if "param" in probe:
            probe["seen"].append(probe["param"].detach().float().clone())
        return [0.0] * len(prompts)

    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        reward=[brightness, spy],
        peft_config=lora_config(),
        max_steps=2,
        learning_rate=5e-2,
        ema_decay=0.5,
        eval_with_ema=True,
        log_samples=False,
    )
    trainer.train()
    name, param = next((n, p) for n, p in trainer.denoiser.named_parameters() if p.requires_grad)
    probe["param"] = param
    trained = param.detach().float().clone()
    trainer.evaluate(Dataset.from_dict({"prompt": ["a cat"]}))
    assert probe["seen"] and torch.equal(probe["seen"][0], trainer.ema.shadow[name])
    assert not torch.equal(trained, trainer.ema.shadow[name])
    assert torch.equal(param.detach().float(), trained)  # the trained weights are back afterwards
    trainer.args.eval_with_ema = False
    probe["seen"].clear()
    trainer.evaluate(Dataset.from_dict({"prompt": ["a cat"]}))
    assert torch.equal(probe["seen"][0], trained)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ema_decay": 1.0}, "ema_decay must be in \\(0, 1\\)"),
        ({"ema_decay": 0.0}, "ema_decay must be in \\(0, 1\\)"),
        ({"ema_decay": 0.9, "ema_start_step": -1}, "ema_start_step must be >= 0"),
        ({"ema_on_cpu": True}, "ema_on_cpu set without ema_decay"),
        ({"eval_with_ema": True, "ema_start_step": 3}, "eval_with_ema, ema_start_step set without ema_decay"),
    ],
)
def test_ema_options_are_checked_early(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)
    assert DanceGRPOConfig.__dataclass_fields__["ema_decay"].default is None  # off by default
