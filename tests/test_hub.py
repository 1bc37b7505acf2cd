"""Hub sharing end to end against a local stand-in of the Hub API: LoRA and full pushes, model cards, token safety."""

import contextlib
import io
import json
import logging
import os

import huggingface_hub
import pytest
import torch
import transformers
from datasets import Dataset
from diffusers import DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load, load_file

from trl_dancegrpo import DanceGRPOTrainer
from trl_dancegrpo.hub import hub_base_model, make_image_grid

from .hub_server import LocalHub
from .test_trainer import lora_config, make_config


TOKEN = "hf_secret_0123456789abcdefDanceGRPO"
REPO_ID = "user/tiny-dancegrpo"
EVAL_PROMPTS = ["a house", "a bird", "a boat", "a lamp", "a fifth prompt not on the card"]
TRAIN_PROMPTS = ["a cat", "a dog", "a car", "a tree"]


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A local Hub on 127.0.0.1 that huggingface_hub (and transformers' shared HfApi) talk to instead of the Hub."""
    hub = LocalHub(str(tmp_path / "hub")).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)  # read from HF_ENDPOINT at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers' shared HfApi captured the endpoint
    yield hub
    hub.stop()


def load_as_hub_model(path, repo_id, tmp_path, monkeypatch):
    """Load a saved pipeline through the Hub cache layout by its repo id, as `from_pretrained("org/name")` does."""
    import shutil

    sha = "a" * 40
    cache = tmp_path / "hf_cache"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(path, repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return DiffusionPipeline.from_pretrained(repo_id, cache_dir=str(cache))


@contextlib.contextmanager
def capture_logs():
    """Every log record of the libraries involved, at DEBUG level, formatted with its arguments."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    names = ["", "transformers", "diffusers", "huggingface_hub", "trl_dancegrpo", "accelerate", "peft"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def make_trainer(model, tmp_path, peft_config=None, **overrides):
    values = dict(hub_model_id=REPO_ID, hub_token=TOKEN, logging_steps=1)
    values.update(overrides)
    return DanceGRPOTrainer(
        model=model,
        reward_funcs="brightness",
        args=make_config(tmp_path, **values),
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS}),
        peft_config=peft_config,
    )


def sample_images(trainer, base: bool) -> list:
    """The card's fixed-prompt samples, recomputed: first 4 eval prompts, seed args.seed, eta 0."""
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    if base:
        denoiser.disable_adapters()
    images, _ = trainer.generate(EVAL_PROMPTS[:4], seed=trainer.args.seed, eta=0.0)
    if base:
        denoiser.enable_adapters()
    return [(image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in images]


def grid_tiles(png: bytes, rows: int, columns: int, size: int = 32, gap: int = 4) -> list[list]:
    import numpy as np

    grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert grid.shape == (rows * size + (rows - 1) * gap, columns * size + (columns - 1) * gap, 3)
    step = size + gap
    return [
        [grid[r * step : r * step + size, c * step : c * step + size] for c in range(columns)] for r in range(rows)
    ]


def assert_token_nowhere(token: str, hub: LocalHub, output_dir: str, *texts: str) -> None:
    for commit in hub.commits:
        for path, content in commit["files"].items():
            assert token.encode() not in content, f"the token was uploaded in {path}"
    for folder, _, names in os.walk(output_dir):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                assert token.encode() not in handle.read(), f"the token was written to {name}"
    for text in texts:
        assert token not in text
    # ...but it did authenticate the uploads (so the searches above looked for the right string)
    commits = [r for r in hub.requests if "/commit/" in r["path"]]
    assert commits
    for request in commits:
        headers = {key.lower(): value for key, value in request["headers"].items()}
        assert headers["authorization"] == f"Bearer {token}"


def test_push_lora_to_hub(tiny_pipeline_path, local_hub, tmp_path, monkeypatch, capfd):
    base_path = tiny_pipeline_path("tiny-flux")
    pipeline = load_as_hub_model(base_path, "org/tiny-flux", tmp_path, monkeypatch)
    with capture_logs() as logs:
        trainer = make_trainer(pipeline, tmp_path, peft_config=lora_config(), learning_rate=1e-2)
        trainer.train()
        trainer.push_to_hub()
    out, err = capfd.readouterr()

    assert REPO_ID in local_hub.repos
    commit = local_hub.commits[-1]
    assert commit["summary"] == "End of training"
    files = local_hub.files(REPO_ID)
    expected = {"pytorch_lora_weights.safetensors", "README.md", "training_args.json", "images/samples.png"}
    expected |= {"images/reward_curve.png"} | {f"images/sample_{i}.png" for i in range(4)}
    assert expected <= set(commit["files"])
    assert "training_args.bin" not in files

    # the card: metadata, rewards, samples, usage, citation
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/tiny-flux"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"dancegrpo", "lora", "diffusers", "flux", "text-to-image"} <= set(card.data.tags)
    assert [w["text"] for w in card.data.widget] == EVAL_PROMPTS[:4]
    final = [log["rewards/brightness/mean"] for log in trainer.state.log_history if "rewards/brightness/mean" in log]
    assert len(final) == 2
    assert f"| brightness | 1 | {final[0]:.4g} (step 1) | {final[1]:.4g} (step 2) |" in card.text
    assert "](images/samples.png)" in card.text and "](images/reward_curve.png)" in card.text
    assert EVAL_PROMPTS[0] in card.text and EVAL_PROMPTS[4] not in card.text
    assert f'pipe.load_lora_weights("{REPO_ID}")' in card.text
    assert 'DiffusionPipeline.from_pretrained("org/tiny-flux"' in card.text
    assert "arXiv:2505.07818" in card.text and "@article{xue2025dancegrpo" in card.text
    assert "| num_generations | 4 |" in card.text and "| learning_rate | 0.01 |" in card.text

    # the grid: the starting model (adapter disabled) on top, the trained model below, pixel for pixel
    tiles = grid_tiles(files["images/samples.png"], rows=2, columns=4)
    for row, base in ((0, True), (1, False)):
        for tile, image in zip(tiles[row], sample_images(trainer, base)):
            assert (tile == image).all()
    assert any((a != b).any() for a, b in zip(*tiles))  # training changed the samples
    assert Image.open(io.BytesIO(files["images/reward_curve.png"])).format == "PNG"
    # sampling for the card left the adapter trainable
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora" in n)

    # the uploaded folder is what `pipe.load_lora_weights("user/repo")` loads, and gives the trained outputs
    call = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")
    trained = trainer.pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    fresh = DiffusionPipeline.from_pretrained(base_path)
    fresh.load_lora_weights(local_hub.repo_dir(REPO_ID))
    loaded = fresh(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)

    assert_token_nowhere(TOKEN, local_hub, trainer.args.output_dir, out, err, logs.getvalue())
    assert "<HUB_TOKEN>" in files["training_args.json"].decode()  # the settings are there, the token is not


@pytest.mark.slow
def test_push_to_hub_in_config_pushes_the_full_model_at_the_end_of_train(
    tiny_pipeline_path, local_hub, tmp_path, capfd
):
    base_path = tiny_pipeline_path("tiny-sd")
    with capture_logs() as logs:
        trainer = make_trainer(base_path, tmp_path, push_to_hub=True, hub_strategy="end", learning_rate=1e-2)
        assert not local_hub.commits
        trainer.train()  # no push_to_hub() call: the end of train() pushes
    out, err = capfd.readouterr()

    assert [commit["summary"] for commit in local_hub.commits] == ["End of training"]
    files = local_hub.files(REPO_ID)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "images/samples.png"} <= set(files)
    assert not any("lora" in path for path in files)
    # the logged rollout samples stay local (`_samples/`: transformers' upload skips `_*`)
    assert any(name.startswith("step-") for name in os.listdir(os.path.join(trainer.args.output_dir, "_samples")))
    assert not any("samples/step-" in path for path in files)

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model is None  # trained from a local path: no Hub id to name
    assert {"dancegrpo", "diffusers", "stable-diffusion", "text-to-image"} <= set(card.data.tags)
    assert "lora" not in card.data.tags
    assert f'unet = UNet2DConditionModel.from_pretrained("{REPO_ID}"' in card.text
    # full fine-tuning: the "before" row was sampled at the start of train(), before the first update
    tiles = grid_tiles(files["images/samples.png"], rows=2, columns=4)
    assert any((a != b).any() for a, b in zip(*tiles))
    for tile, image in zip(tiles[1], sample_images(trainer, base=False)):
        assert (tile == image).all()
    fresh = make_trainer(base_path, tmp_path / "fresh")
    for tile, image in zip(tiles[0], sample_images(fresh, base=False)):
        assert (tile == image).all()

    # the uploaded denoiser loads with from_pretrained, into the pipeline as the card shows
    unet = UNet2DConditionModel.from_pretrained(local_hub.repo_dir(REPO_ID))
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), unet.named_parameters()):
        assert torch.equal(p.detach(), q), name
    call = dict(prompt="a blue house", height=32, width=32, num_inference_steps=3, output_type="pt")
    pipe = DiffusionPipeline.from_pretrained(base_path, unet=unet)
    loaded = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    trained = trainer.pipeline(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(loaded, trained)

    assert_token_nowhere(TOKEN, local_hub, trainer.args.output_dir, out, err, logs.getvalue())


@pytest.mark.slow
def test_cli_push_to_hub_uploads_the_lora_card_and_metrics(local_hub, tmp_path, capfd):
    from trl_dancegrpo.cli import run
    from trl_dancegrpo.tiny import tiny_flux_pipeline

    out = tmp_path / "cli"
    argv = ["--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true", "--push_to_hub", "true"]
    argv += ["--hub_model_id", REPO_ID, "--hub_token", TOKEN]
    with capture_logs() as logs:
        run(argv=argv)  # the built-in tiny FLUX LoRA demo
    stdout, stderr = capfd.readouterr()

    assert [commit["summary"] for commit in local_hub.commits] == ["End of training"]
    files = local_hub.files(REPO_ID)
    expected = {"pytorch_lora_weights.safetensors", "README.md", "images/samples.png", "images/reward_curve.png"}
    assert expected | {"metrics.json", "reward_curve.png", "training_args.json"} <= set(files)
    assert not any(path.startswith("_samples/") or path.endswith("training_args.bin") for path in files)
    history = json.loads(files["metrics.json"])
    assert sum("rewards/brightness/mean" in log for log in history) == 2  # written before the push, complete
    pipeline = tiny_flux_pipeline()
    pipeline.load_lora_weights(local_hub.repo_dir(REPO_ID))
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())
    assert_token_nowhere(TOKEN, local_hub, str(out), stdout, stderr, logs.getvalue())


@pytest.mark.slow
def test_checkpoint_pushes_upload_the_lora_and_the_checkpoint(tiny_pipeline_path, local_hub, tmp_path):
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"),
        tmp_path,
        peft_config=lora_config(),
        push_to_hub=True,
        hub_strategy="checkpoint",
        hub_always_push=True,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    summaries = [commit["summary"] for commit in local_hub.commits]
    assert summaries[-1] == "End of training"
    for step in (1, 2):
        assert f"Training in progress, step {step}" in summaries
        assert f"Training in progress, step {step}, checkpoint" in summaries
    for commit in local_hub.commits:
        if commit["summary"].endswith(", checkpoint"):
            assert "last-checkpoint/pytorch_lora_weights.safetensors" in commit["files"]
        else:
            assert {"pytorch_lora_weights.safetensors", "README.md", "images/samples.png"} <= set(commit["files"])
        assert not any(path.endswith("training_args.bin") for path in commit["files"])
    # the repo ends with the final weights, at the top and in last-checkpoint/
    files = local_hub.files(REPO_ID)
    final = load_file(os.path.join(trainer.args.output_dir, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    for path in ("pytorch_lora_weights.safetensors", "last-checkpoint/pytorch_lora_weights.safetensors"):
        uploaded = load(files[path])
        assert uploaded.keys() == final.keys()
        assert all(torch.equal(uploaded[key], final[key]) for key in final)
    assert_token_nowhere(TOKEN, local_hub, trainer.args.output_dir)


def test_base_model_is_a_hub_id_only(tiny_pipeline_path, tmp_path, monkeypatch):
    path = tiny_pipeline_path("tiny-sd")
    assert hub_base_model(DiffusionPipeline.from_pretrained(path)) is None  # a local path
    assert hub_base_model(load_as_hub_model(path, "org/tiny-sd", tmp_path, monkeypatch)) == "org/tiny-sd"
    from trl_dancegrpo.tiny import tiny_sd_pipeline

    assert hub_base_model(tiny_sd_pipeline()) is None  # built in memory


def test_image_grid_shows_the_first_frame_of_videos():
    images = torch.rand(3, 3, 16, 16)
    videos = torch.stack([images, torch.rand(3, 3, 16, 16)], dim=1)  # (N, F, 3, H, W), frame 0 = images
    grid = make_image_grid([images, videos], gap=2)
    assert grid.size == (3 * 16 + 2 * 2, 2 * 16 + 2)
    top, bottom = (torch.tensor(list(grid.crop((0, y, 52, y + 16)).getdata())) for y in (0, 18))
    assert torch.equal(top, bottom)
    big = make_image_grid([torch.rand(2, 3, 1024, 512)], max_tile=256)
    assert big.size == (2 * 128 + 4, 256)


def test_card_without_a_push_or_before_samples(tiny_pipeline_path, tmp_path):
    # full fine-tuning without push_to_hub: no samples of the starting model were kept, the card says so
    trainer = make_trainer(tiny_pipeline_path("tiny-flux"), tmp_path, hub_model_id=None, max_steps=1)
    trainer.train()
    trainer.create_model_card()
    output_dir = trainer.args.output_dir
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    assert "no samples of the starting model were recorded" in card.text
    assert 'FluxTransformer2DModel.from_pretrained("<your-username>/out"' in card.text
    with open(os.path.join(output_dir, "images", "samples.png"), "rb") as handle:
        grid_tiles(handle.read(), rows=1, columns=4)


@pytest.mark.slow
def test_image_to_video_card_shows_first_frames(tiny_pipeline_path, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny video models crawl on two threads when another process is busy
    try:
        colors = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (240, 240, 240)]
        images = [Image.new("RGB", (32, 32), color) for color in colors]
        dataset = Dataset.from_dict({"prompt": TRAIN_PROMPTS, "image": images})
        trainer = DanceGRPOTrainer(
            model=tiny_pipeline_path("tiny-wan-i2v"),
            reward_funcs="brightness",
            args=make_config(tmp_path, num_frames=5, max_steps=1, hub_model_id=REPO_ID),
            train_dataset=dataset,
            peft_config=lora_config(),
        )
        trainer.train()
        trainer.create_model_card()
        videos, _ = trainer.generate(TRAIN_PROMPTS, seed=trainer.args.seed, eta=0.0, images=images)
    finally:
        torch.set_num_threads(threads)
    output_dir = trainer.args.output_dir
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    assert card.data.pipeline_tag == "image-to-video"
    assert {"wan", "lora", "image-to-video"} <= set(card.data.tags)
    assert "image=image, prompt=" in card.text and "num_frames=5" in card.text
    with open(os.path.join(output_dir, "images", "samples.png"), "rb") as handle:
        tiles = grid_tiles(handle.read(), rows=2, columns=4)
    assert videos.dim() == 5
    first_frames = (videos[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for tile, frame in zip(tiles[1], first_frames):
        assert (tile == frame).all()


@pytest.mark.parametrize(
    "algorithm, name, paper, own_setting, absent",
    [
        ("grpo", "DanceGRPO", "2505.07818", "| sde_type | dancegrpo |", "nft_beta"),
        ("nft", "DiffusionNFT", "2509.16117", "| nft_beta | 1 |", "sde_type"),
        ("awm", "Advantage Weighted Matching (AWM)", "2509.25050", "| awm_weighting | ghuber |", "sde_type"),
        ("grpo_guard", "GRPO-Guard", "2510.22319", "| guard_gradient_reweighting | True |", "nft_beta"),
    ],
)
def test_card_names_the_algorithm_its_settings_and_paper(
    algorithm, name, paper, own_setting, absent, tiny_pipeline_path, tmp_path
):
    # a card of an NFT, AWM or GRPO-Guard run says so, shows that objective's settings (not GRPO's sampler noise) and
    # cites its paper
    trainer = make_trainer(
        tiny_pipeline_path("tiny-flux"), tmp_path, hub_model_id=None, max_steps=1, algorithm=algorithm
    )
    trainer.train()
    trainer.create_model_card()
    text = ModelCard.load(os.path.join(trainer.args.output_dir, "README.md")).text
    assert f"using [{name}](https://huggingface.co/papers/{paper})" in text
    assert f"| algorithm | {algorithm} ({name}) |" in text
    assert own_setting in text and f"| {absent} |" not in text
    assert f"arXiv:{paper}" in text.split("## Citation")[1]
    procedure = text.split("## Training procedure")[1].split("|")[0]
    if algorithm in ("nft", "awm"):
        assert "| eta |" not in text and "deterministic (ODE) sampler" in procedure
    else:
        assert "| eta |" in text and "stochastic (SDE) sampler" in procedure
    if algorithm == "grpo_guard":  # both papers: the sampler is DanceGRPO's
        assert "arXiv:2505.07818" in text.split("## Citation")[1]
