"""What saving a sharded (FSDP) denoiser needs: its own class, and writing a gathered state dict in diffusers' layout."""

import json
import os

import torch


def plain_class(module: torch.nn.Module) -> type:
    """The module's own class: FSDP2 shards a module in place by swapping its class for a subclass `FSDP<Name>`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return type(module)
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def save_denoiser_state_dict(
    denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor], output_dir: str, max_shard_size: str = "10GB"
) -> None:
    """Write `state_dict` (gathered from the shards) and `denoiser`'s config the way `save_pretrained` does.

    The files (`config.json`, `diffusion_pytorch_model[-0000k-of-0000n].safetensors` and the index of the shards) load
    with `from_pretrained`, as if the unsharded model had saved itself.
    """
    from huggingface_hub import save_torch_state_dict

    os.makedirs(output_dir, exist_ok=True)
    denoiser.save_config(output_dir)
    config_path = os.path.join(output_dir, denoiser.config_name)
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["_class_name"] = plain_class(denoiser).__name__  # not FSDP's `FSDP<Name>`
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    # a gathered tensor can be a view into a larger buffer, which safetensors refuses: copy those (only those)
    state_dict = {
        name: tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()
        for name, tensor in state_dict.items()
    }
    save_torch_state_dict(
        state_dict,
        output_dir,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
