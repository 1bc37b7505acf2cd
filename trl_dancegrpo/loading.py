"""Loading a diffusers pipeline by Hub id or local path, with one clear error when it cannot be had offline."""

import os


def load_pipeline(name_or_path: str, dtype=None):
    """`DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype)`; a model that is neither a local folder nor in the
    Hugging Face cache, with the Hub out of reach, is an `OSError` naming the model and what to do.

    Without network the cache is used at once (no half minute of retries).
    """
    from diffusers import DiffusionPipeline

    from .rewards._loading import _hub_unreachable

    kwargs = {} if dtype is None else {"dtype": dtype}  # `dtype`: diffusers deprecates `torch_dtype`
    local = os.path.isdir(os.path.expanduser(name_or_path))
    unreachable = None if local else _hub_unreachable()
    try:
        return DiffusionPipeline.from_pretrained(
            os.path.expanduser(name_or_path) if local else name_or_path,
            local_files_only=unreachable is not None,
            **kwargs,
        )
    except OSError as error:
        if local:
            raise
        reason = unreachable or f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        raise OSError(
            f"Could not load the pipeline {name_or_path!r}: it is not a local folder, not (completely) in the Hugging "
            f"Face cache, and it could not be downloaded ({reason}). On a machine with Hub access run "
            f"`hf download {name_or_path} --local-dir DIR` and pass DIR as the model (--model_name_or_path DIR), or "
            "fill the cache there and set HF_HUB_CACHE to it here."
        ) from None
