import pytest
import transformers
from datasets import Dataset

from trl_dancegrpo.tiny import save_tiny_pipeline


transformers.logging.set_verbosity_error()

TRAIN_PROMPTS = ["a cat", "a dog", "a red car", "a tree"]


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
