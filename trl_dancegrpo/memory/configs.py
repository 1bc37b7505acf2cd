"""Pipeline configurations without weights, and real-size pipelines built from them on the meta device.

A configuration comes from, in this order: a local pipeline folder (`model_index.json` and each component's config
file), the Hugging Face Hub cache (config files only, offline), or the built-in table in `trl_dancegrpo/model_configs/`
(the public configurations of the checkpoints our recipes name, each JSON file with its sources).
"""

import glob
import json
import os


MODEL_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_configs")
_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
# a processor's folder also holds its tokenizer's files: its own configuration comes first
_PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
# the Qwen2-VL tokens a vision-language prompt encoder finds its image by (ids of the estimate's stand-in tokenizer)
_VISION_TOKEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def builtin_configs() -> dict[str, dict]:
    """The built-in table: every model id and alias -> its configuration (a dict loaded from its JSON file)."""
    table = {}
    for path in sorted(glob.glob(os.path.join(MODEL_CONFIGS_DIR, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            entry = json.load(handle)
        if "model_index" not in entry:  # rewards.json
            continue
        entry["source_file"] = os.path.basename(path)
        for name in (entry["model_id"], *entry.get("aliases", [])):
            table[name] = entry
    return table


def _read_folder(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        model_index = json.load(handle)
    components = {}
    for name, spec in model_index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        for filename in _PROCESSOR_CONFIG_FILES if str(spec[1]).endswith("Processor") else _CONFIG_FILES:
            path = os.path.join(folder, name, filename)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    components[name] = json.load(handle)
                break
        else:
            components[name] = {}
    return {"model_id": folder, "model_index": model_index, "components": components, "sources": [folder]}


def _hub_cache_folder(model_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True, allow_patterns=["*.json", "*.txt", "*.model"])
    except Exception:  # not cached (or not a valid repo id): the built-in table is next
        return None


def load_pipeline_config(model_name_or_path: str) -> dict:
    """The configuration of a pipeline: `{"model_id", "model_index", "components": {name: config}, "sources"}`."""
    if os.path.isdir(model_name_or_path):
        if not os.path.isfile(os.path.join(model_name_or_path, "model_index.json")):
            raise ValueError(
                f"{model_name_or_path} is a folder without model_index.json: give a diffusers pipeline folder (its "
                "config files are enough, no weights are read)."
            )
        return _read_folder(model_name_or_path)
    table = builtin_configs()
    folder = _hub_cache_folder(model_name_or_path)
    if folder is not None and os.path.isfile(os.path.join(folder, "model_index.json")):
        return _read_folder(folder)
    if model_name_or_path in table:
        return table[model_name_or_path]
    known = sorted({entry["model_id"] for entry in table.values()})
    raise ValueError(
        f"No configuration for {model_name_or_path!r}: it is not a local pipeline folder, not in the Hugging Face "
        f"cache, and not in the built-in table ({', '.join(known)}). Download its config files only (e.g. "
        f"`huggingface-cli download {model_name_or_path} --include '*.json'`) or point --model_name_or_path to a "
        "folder with model_index.json and each component's config.json."
    )


def _tokenizer(class_name: str, config: dict):
    from ..tiny import _clip_tokenizer, _gemma_tokenizer, _llama_tokenizer, _qwen_tokenizer, _t5_tokenizer

    # Tokens only decide shapes here: an in-memory vocabulary with the checkpoint's maximum length pads exactly as the
    # real tokenizer does (prompts are padded to max_length by every supported pipeline).
    max_length = config.get("model_max_length", 77)
    if max_length > 1_000_000:  # "no limit" placeholders of some tokenizer configs
        max_length = 512
    if class_name.startswith("CLIP"):
        return _clip_tokenizer(max_length)
    if class_name.startswith(("T5", "UMT5", "AutoTokenizer")):
        return _t5_tokenizer(max_length)
    if class_name.startswith(("Llama", "PreTrainedTokenizer")):
        return _llama_tokenizer(max_length)
    if class_name.startswith("Qwen2Tokenizer"):
        return _qwen_tokenizer(max_length)
    if class_name.startswith("ByT5"):  # byte-level: the real class needs no vocabulary file
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(model_max_length=max_length)
    if class_name.startswith("GemmaTokenizer"):  # LTX-2's Gemma 3 (left padding, as the pipeline sets it)
        return _gemma_tokenizer(max_length)
    raise ValueError(f"No stand-in for the tokenizer class {class_name}.")


def _processor(class_name: str, config: dict):
    """A Qwen2-VL processor: the checkpoint's image processor (its patch and merge sizes decide the image's tokens) and
    a stand-in tokenizer that counts the Qwen-Image prompt templates' tokens as the real one does (the pipelines drop a
    fixed number of them) and has Qwen's vision tokens."""
    import transformers

    from ..tiny import _qwen_image_tokenizer

    if class_name == "PixtralProcessor":  # FLUX.2 [dev]'s prompt processor: a stand-in tokenizer, Mistral's template
        from ..tiny import _pixtral_processor

        return _pixtral_processor(
            config.get("model_max_length", 512),
            config.get("patch_size", 14),
            1540,
            config.get("spatial_merge_size", 1),
        )
    if class_name == "Qwen3VLProcessor":  # Qwen-Image 2.1's: a stand-in tokenizer, the chat template's text turns
        from ..tiny import _qwen3_vl_processor

        image_config = config.get("image_processor", config)
        size = image_config.get("size", {})
        return _qwen3_vl_processor(
            131072,  # prompts are not cut (the pipeline has no limit)
            size.get("shortest_edge", 65536),
            size.get("longest_edge", 16777216),
            image_config.get("patch_size", 16),
            image_config.get("merge_size", 2),
        )
    if class_name not in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"):
        return getattr(transformers, class_name)(**config)
    image_config = dict(config.get("image_processor", config))
    for key in ("image_processor_type", "processor_class", "_processor_class", "auto_map"):
        image_config.pop(key, None)
    tokenizer = _qwen_image_tokenizer()
    tokenizer.model_max_length = 131072  # prompts are not cut: the pipelines' own limits apply
    return getattr(transformers, class_name)(
        image_processor=transformers.Qwen2VLImageProcessor(**image_config),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
    )


def _transformers_model(class_name: str, config: dict):
    import transformers

    config = dict(config)
    model_type = config.pop("model_type")
    for key in (
        "architectures",
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
    ):
        config.pop(key, None)
    model_config = transformers.AutoConfig.for_model(model_type, **config)
    model_config._attn_implementation = "sdpa"
    return getattr(transformers, class_name)._from_config(model_config)


def build_meta_pipeline(config: dict):
    """The pipeline of `config` with every model on the meta device (no memory), tokenizers that pad to the real length."""
    import diffusers
    import torch

    model_index, components = config["model_index"], {}
    for name, spec in model_index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):  # a pipeline argument that is not a component (FLUX.2 klein's is_distilled)
            components[name] = spec
            continue
        library, class_name = spec
        component_config = config["components"].get(name, {})
        if class_name is None:
            components[name] = None
        elif "Tokenizer" in class_name:
            components[name] = _tokenizer(class_name, component_config)
        elif "Scheduler" in class_name:
            components[name] = getattr(diffusers, class_name).from_config(component_config)
        elif "Processor" in class_name or "FeatureExtractor" in class_name:
            components[name] = _processor(class_name, component_config)
        elif library == "diffusers":
            with torch.device("meta"):
                components[name] = getattr(diffusers, class_name).from_config(component_config)
        elif library != "transformers":  # a pipeline's own module (LTX-2's connectors and vocoder: library "ltx2")
            import importlib

            module = importlib.import_module(f"diffusers.pipelines.{library}")
            with torch.device("meta"):
                components[name] = getattr(module, class_name).from_config(component_config)
        else:
            with torch.device("meta"):
                components[name] = _transformers_model(class_name, component_config)
    processor, text_encoder = components.get("processor"), components.get("text_encoder")
    if processor is not None and hasattr(processor, "image_token") and text_encoder is not None:
        # the vision tokens' ids are the stand-in tokenizer's, not the checkpoint's
        for key, token in _VISION_TOKEN_IDS.items():
            if hasattr(text_encoder.config, key):
                setattr(text_encoder.config, key, processor.tokenizer.convert_tokens_to_ids(token))
    pipeline_class = getattr(diffusers, model_index["_class_name"])
    return pipeline_class(**components)
