import pytest
import transformers
from datasets import Dataset

from trl_dancegrpo.tiny import save_tiny_pipeline


transformers.logging.set_verbosity_error()

TRAIN_PROMPTS = ["a cat", "a dog", "a red car", "a tree"]

# The modules that run the same tests over every family beyond the core ones (SD and FLUX, tested by test_trainer.py,
# test_sampler.py and the others). The fast subset (`-m "not slow"`) keeps one smoke test per family from them, its
# LoRA `test_train` (every trainable parameter changes, nothing frozen does); the rest of their matrix is marked slow
# here and runs in the full suite (CI).
FAMILY_MATRIX_MODULES = {
    "test_editing",
    "test_flux2_dev",
    "test_hunyuan_video15",
    "test_ltx2",
    "test_qwen3_image_families",
    "test_qwen_image",
    "test_qwen_image21",
    "test_sampler_families",
    "test_sd3",
    "test_video",
    "test_wan22",
    "test_wan_v2v",
}


def pytest_collection_finish(session):
    from .real_size import TESTS, RealSizeRuns

    if any(getattr(item, "originalname", None) in TESTS for item in session.items):
        session.config.real_size_runs = RealSizeRuns(session.items)


def pytest_sessionfinish(session):
    runs = getattr(session.config, "real_size_runs", None)
    if runs is not None:
        runs.close()


def pytest_collection_modifyitems(config, items):
    from .real_size import TESTS

    for item in items:
        smoke = item.originalname == "test_train" and "lora" in item.name
        if item.module.__name__.rpartition(".")[2] in FAMILY_MATRIX_MODULES and not smoke:
            item.add_marker(pytest.mark.slow)
    # The real-size estimates run in the background from the start (tests/real_size.py); the tests that read them go
    # last, so the suite does not wait for them while other tests could run.
    items.sort(key=lambda item: getattr(item, "originalname", None) in TESTS)


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory):
    """Tiny random pipelines saved to disk once; tests load them by path, as a user's Hub id is loaded."""
    root = tmp_path_factory.mktemp("pipelines")
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = save_tiny_pipeline(name, str(root / name))
        return paths[name]

    return get


@pytest.fixture
def prompts_dataset():
    return Dataset.from_dict({"prompt": TRAIN_PROMPTS})
