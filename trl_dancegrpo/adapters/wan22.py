"""Wan 2.2 A14B text-to-video (`WanPipeline` with `transformer_2`): two experts of the same architecture, `transformer`
for the high-noise steps and `transformer_2` for the low-noise ones, switched where `WanPipeline.__call__` switches
them (t >= boundary_ratio * num_train_timesteps: `transformer`).

The trainer trains one module: `WanExperts` holds both experts (the pipeline's own modules, so the pipeline samples
with the trained weights) and sends each row of a batch to the expert of its step, so the loss can re-score samples at
different steps in one call. Each trained expert gets its own LoRA, saved in diffusers' two-file convention.
"""

import copy
import os

import torch

from .base import Conditioning
from .wan import WanAdapter


EXPERT_NAMES = ("transformer", "transformer_2")  # high noise, low noise
LORA_WEIGHT_NAMES = {
    "transformer": "pytorch_lora_weights.safetensors",
    "transformer_2": "pytorch_lora_weights_transformer_2.safetensors",
}


class WanExperts(torch.nn.Module):
    """Both experts of a Wan 2.2 pipeline as one model; `trained` names the experts the trainer updates.

    It offers what the trainer asks of a diffusers model (`add_adapter`, `disable_adapters`, `peft_config`,
    `enable_gradient_checkpointing`, `save_pretrained`), applied to the trained experts.
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, trained=EXPERT_NAMES):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.trained = tuple(trained)

    def forward(self, hidden_states, timestep, expert: torch.Tensor, **kwargs) -> torch.Tensor:
        """The output of each row's expert (`expert[i]`: 0 = `transformer`, 1 = `transformer_2`); the rows of one
        expert go through it in one batch, so a batch of one step is one call, as in the pipeline."""
        experts = (self.transformer, self.transformer_2)
        used = expert.unique().tolist()
        if len(used) == 1:
            return experts[used[0]](hidden_states=hidden_states, timestep=timestep, **kwargs)[0]
        output = None
        for index in used:
            rows = (expert == index).nonzero().squeeze(1)
            part = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            result = experts[index](hidden_states=hidden_states[rows], timestep=timestep[rows], **part)[0]
            if output is None:
                output = result.new_empty((hidden_states.shape[0], *result.shape[1:]))
            output[rows] = result
        return output

    def trained_experts(self) -> list[tuple[str, torch.nn.Module]]:
        return [(name, getattr(self, name)) for name in self.trained]

    @property
    def peft_config(self) -> dict:
        configs = [getattr(model, "peft_config", None) for _, model in self.trained_experts()]
        return next((config for config in configs if config), {})

    def add_adapter(self, peft_config) -> None:
        for _, model in self.trained_experts():
            model.add_adapter(copy.deepcopy(peft_config))

    def disable_adapters(self) -> None:
        for _, model in self.trained_experts():
            model.disable_adapters()

    def enable_adapters(self) -> None:
        for _, model in self.trained_experts():
            model.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for _, model in self.trained_experts():
            model.enable_gradient_checkpointing()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Each trained expert into its pipeline subfolder (`transformer/`, `transformer_2/`)."""
        for name, model in self.trained_experts():
            model.save_pretrained(os.path.join(save_directory, name), **kwargs)


class Wan22Adapter(WanAdapter):
    """Wan 2.2 A14B text-to-video: two experts, both trained by default (`train_experts` picks), CFG on both with the
    same scale (the pipeline's `guidance_scale_2` when left unset)."""

    pipeline_class_names = ("WanPipeline",)
    has_experts = True
    default_guidance_scale = 4.0  # Wan 2.2 A14B's text-to-video default (its `sample_guide_scale` for high noise)

    @classmethod
    def accepts(cls, pipeline) -> bool:
        return getattr(pipeline, "transformer_2", None) is not None

    def __init__(self, pipeline, *args, train_experts=None, **kwargs):
        name = type(pipeline).__name__
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError(
                f"This Wan 2.2 {name} has no `transformer` (the high-noise expert): training needs both experts; load "
                "the checkpoint with both."
            )
        if pipeline.config.get("boundary_ratio") is None:
            raise ValueError(
                f"This {name} has a `transformer_2` but no `boundary_ratio`, so the pipeline never calls it; set "
                "`pipeline.register_to_config(boundary_ratio=...)` (0.875 for Wan 2.2 A14B text-to-video) or drop "
                "`transformer_2`."
            )
        train_experts = list(EXPERT_NAMES) if train_experts is None else list(train_experts)
        if not train_experts or set(train_experts) - set(EXPERT_NAMES):
            raise ValueError(
                f"train_experts={train_experts}: choose one or both of {list(EXPERT_NAMES)} ('transformer': high "
                "noise, 'transformer_2': low noise)."
            )
        super().__init__(pipeline, *args, **kwargs)
        self.experts = WanExperts(pipeline.transformer, pipeline.transformer_2, trained=train_experts)
        # each step's expert, decided on its timestep as WanPipeline does (1 = transformer_2, the low-noise expert)
        boundary = pipeline.config.boundary_ratio * pipeline.scheduler.config.get("num_train_timesteps", 1000)
        steps = torch.arange(self.num_inference_steps)
        self.expert_of_step = (self.timestep(steps, "cpu") < boundary).long()

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.experts

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {name: module for name, module in super().frozen_modules().items() if name not in EXPERT_NAMES}

    def unused_parameter_prefixes(self) -> list[str]:
        return [name for name in EXPERT_NAMES if name not in self.experts.trained]  # the expert left as it is

    def predict(self, denoiser, latents, step_index, cond: Conditioning) -> torch.Tensor:
        return denoiser(
            hidden_states=self.model_input(latents, cond),
            timestep=self.model_timestep(step_index, latents.device),
            expert=self.expert_of_step.to(latents.device)[step_index],
            encoder_hidden_states=cond["prompt_embeds"],
            return_dict=False,
        )

    # -- LoRA files: diffusers' two-expert convention ----------------------------------------------------------------
    def save_lora_weights(self, save_directory: str, lora_state_dict: dict, lora_metadata: dict | None) -> None:
        """`pytorch_lora_weights.safetensors` for `transformer`, `pytorch_lora_weights_transformer_2.safetensors` for
        `transformer_2` (each trained expert's), both with keys `transformer.*` as `load_lora_weights` expects."""
        for name in self.experts.trained:
            prefix = f"{name}."
            layers = {k.removeprefix(prefix): v for k, v in lora_state_dict.items() if k.startswith(prefix)}
            type(self.pipeline).save_lora_weights(
                save_directory,
                transformer_lora_layers=layers,
                transformer_lora_adapter_metadata=lora_metadata,
                weight_name=LORA_WEIGHT_NAMES[name],
            )

    def load_trained_weights(self, denoiser, folder: str, is_lora: bool) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name, model in denoiser.trained_experts():
            if not is_lora:
                saved = type(model).from_pretrained(folder, subfolder=name)
                model.load_state_dict(saved.state_dict())
                continue
            path = os.path.join(folder, LORA_WEIGHT_NAMES[name])
            if not os.path.isfile(path):
                raise ValueError(f"{folder} holds no LoRA weights for {name} ({LORA_WEIGHT_NAMES[name]}).")
            state_dict = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
            result = set_peft_model_state_dict(model, state_dict)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(
                    f"The LoRA of {name} in {folder} does not match the model's adapter (unexpected keys such as "
                    f"{result.unexpected_keys[:3]}); resume with the same peft_config and train_experts."
                )

    def trained_components(self) -> list[str]:
        return list(self.experts.trained)

    def lora_load_arguments(self, folder: str | None = None, named: bool = False) -> list[str]:
        prefix = f"{folder}/" if folder else ""
        first = f', weight_name="{prefix}{LORA_WEIGHT_NAMES["transformer"]}"' if folder is not None or named else ""
        second = f', weight_name="{prefix}{LORA_WEIGHT_NAMES["transformer_2"]}", load_into_transformer_2=True'
        arguments = {"transformer": first, "transformer_2": second}
        return [arguments[name] for name in self.experts.trained]
