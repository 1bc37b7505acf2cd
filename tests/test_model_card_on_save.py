"""As TRL does, the model card is written next to the saved weights: at each checkpoint and on `save_model`."""

import os

from huggingface_hub import ModelCard

from .test_trainer import lora_config, make_trainer


def test_checkpoints_and_save_model_write_the_card(tiny_pipeline_path, tmp_path):
    path = tiny_pipeline_path("tiny-flux")
    trainer = make_trainer(
        path, tmp_path, peft_config=lora_config(), max_steps=1, save_strategy="steps", save_steps=1, log_samples=False
    )
    trainer.train()
    out = tmp_path / "out"
    assert {"README.md", "images"} <= set(os.listdir(out))  # written when checkpoint-1 was saved
    card = ModelCard.load(str(out / "README.md"))
    assert "pipe.load_lora_weights(" in card.text and "images/samples.png" in card.text
    assert card.data.base_model is None  # a local folder is not a Hub id ...
    assert f"loaded from the local folder `{os.path.abspath(path)}`" in card.text  # ... but it is named
    assert f'from_pretrained("{os.path.abspath(path)}"' in card.text

    final = tmp_path / "final"
    trainer.save_model(str(final))
    assert {"pytorch_lora_weights.safetensors", "README.md", "images"} <= set(os.listdir(final))
    assert (final / "images" / "samples.png").read_bytes()[:4] == b"\x89PNG"
