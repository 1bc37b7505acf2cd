"""An exponential moving average (EMA) of the policy's trained weights, as the official DanceGRPO scripts keep one
(`--use_ema --ema_decay 0.995`).

The EMA starts as a float32 copy of the trained weights (at the start of training, or once `ema_start_step` optimizer
steps are done) and after every later optimizer step becomes `decay * ema + (1 - decay) * weights`. Only the trained
parameters are averaged (with LoRA: the adapter's). Each process keeps the part of every parameter it holds: the whole
tensor without FSDP, its own shard under FSDP, so the EMA is sharded as the weights are and updating it needs no
communication. `applied()` puts the EMA into the model for a while (evaluation, saving `ema/`), the weights are put
back afterwards, bit for bit.
"""

import contextlib
import os

import torch
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)
EMA_FOLDER = "ema"  # inside a saved model: the EMA weights, in the main weights' format
EMA_STATE_NAME = "ema_state.safetensors"  # inside a checkpoint: the exact float32 EMA (per process under FSDP)


def local_part(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this process holds and updates in place: an FSDP2 parameter's local shard, else the
    parameter's data (FSDP1 with `use_orig_params` already shows each process its own piece)."""
    to_local = getattr(param, "to_local", None)
    return to_local() if to_local is not None else param.data


def ema_state_name(sharded: bool, process_index: int) -> str:
    """The checkpoint file of this process's EMA: one for all processes, or one per process when sharded."""
    return f"ema_state_{process_index}.safetensors" if sharded else EMA_STATE_NAME


class PolicyEMA:
    """The EMA of `parameters` (name -> trained parameter), kept in float32 on `device`.

    Args:
        parameters (`dict[str, torch.nn.Parameter]`): The trained parameters, by name.
        decay (`float`): The decay, in (0, 1).
        start_step (`int`): The optimizer step after which the EMA starts as a copy of the weights (0: at the start).
        device: Where the EMA lives (the accelerator, or the CPU with `ema_on_cpu`).
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, start_step: int = 0, device="cpu"):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}.")
        self.parameters = parameters
        self.decay = decay
        self.start_step = start_step
        self.device = torch.device(device)
        self.shadow: dict[str, torch.Tensor] | None = None  # None until the EMA starts
        self.num_updates = 0

    @property
    def started(self) -> bool:
        return self.shadow is not None

    @torch.no_grad()
    def start(self) -> None:
        """The EMA becomes a float32 copy of the current weights."""
        self.shadow = {
            name: local_part(param).detach().to(self.device, torch.float32, copy=True).contiguous()
            for name, param in self.parameters.items()
        }
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """`ema = decay * ema + (1 - decay) * weights`, one parameter at a time (memory stays flat)."""
        for name, param in self.parameters.items():
            # lerp: ema + (1 - decay) * (weights - ema), the same average in one fused kernel
            self.shadow[name].lerp_(local_part(param).to(self.device, torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    def step(self, global_step: int) -> None:
        """After an optimizer step (`global_step` steps done): update the EMA, or start it at `start_step`."""
        if self.started:
            self.update()
        elif global_step >= self.start_step:
            self.start()

    @contextlib.contextmanager
    def applied(self):
        """Inside the context the model holds the EMA weights (cast to the weights' dtype); the trained weights are
        restored exactly afterwards. Without a started EMA, the model is left as it is."""
        if not self.started:
            yield
            return
        backup = {}
        with torch.no_grad():
            for name, param in self.parameters.items():
                part = local_part(param)
                backup[name] = part.detach().clone()
                part.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.parameters.items():
                    local_part(param).copy_(backup[name])

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the exact state (float32 tensors, and the settings it was made with) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {name: tensor.cpu() for name, tensor in (self.shadow or {}).items()}
        metadata = {
            "decay": repr(self.decay),
            "start_step": str(self.start_step),
            "started": str(self.started),
            "num_updates": str(self.num_updates),
        }
        save_file(tensors, path, metadata=metadata)

    def load(self, path: str) -> None:
        """Restore the state `save` wrote; refuse one made with another decay or for other parameters."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # (a safe_open handle is not iterable)
            tensors = {name: handle.get_tensor(name) for name in names}
        saved_decay = float(metadata.get("decay", "nan"))
        if saved_decay != self.decay:
            raise ValueError(
                f"The checkpoint's EMA ({path}) was kept with ema_decay {saved_decay}, this run has {self.decay}: "
                "resume with the original run's ema_decay."
            )
        if metadata.get("started") != "True":
            self.shadow, self.num_updates = None, 0
            return
        names = set(self.parameters)
        if set(tensors) != names:
            missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
            raise ValueError(
                f"The checkpoint's EMA ({path}) does not match the trained parameters of this run (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}): resume with the original run's model, LoRA settings "
                "and number of processes."
            )
        for name, tensor in tensors.items():
            if tensor.shape != local_part(self.parameters[name]).shape:
                raise ValueError(
                    f"The checkpoint's EMA ({path}) holds {name} with shape {tuple(tensor.shape)}, this process "
                    f"trains a part of shape {tuple(local_part(self.parameters[name]).shape)}: under FSDP, resume "
                    "with the number of processes of the original run."
                )
        self.shadow = {name: tensor.to(self.device, torch.float32) for name, tensor in tensors.items()}
        self.num_updates = int(metadata.get("num_updates", 0))


def trained_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of `module` that training updates (with LoRA: the adapter's), by name."""
    return {name: param for name, param in module.named_parameters() if param.requires_grad}


class EMACallback(TrainerCallback):
    """Keeps the trainer's EMA: built (or restored from the checkpoint resumed from) when training begins, then
    stepped after every optimizer step, before the step's checkpoint is written."""

    def __init__(self, trainer):
        import weakref

        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        device = "cpu" if args.ema_on_cpu else trainer.accelerator.device
        ema = PolicyEMA(trained_parameters(trainer.denoiser), args.ema_decay, args.ema_start_step, device)
        checkpoint = trainer._ema_resumed_from
        path = None if checkpoint is None else os.path.join(checkpoint, trainer._ema_state_name())
        if path is not None and os.path.isfile(path):
            ema.load(path)
        elif checkpoint is not None and state.global_step > args.ema_start_step:
            logger.warning(
                f"The checkpoint {checkpoint} holds no EMA (it was saved without ema_decay): the EMA starts now, at "
                f"step {state.global_step}, from the current weights."
            )
            ema.start()
        elif state.global_step >= args.ema_start_step:
            ema.start()
        trainer.ema = ema

    def on_step_end(self, args, state, control, **kwargs):
        self._trainer().ema.step(state.global_step)
