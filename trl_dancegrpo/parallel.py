"""Context (sequence) parallelism through diffusers: the processes of one group share each sample and split its tokens.

The launched world of `W` processes splits into `W / C` data-parallel groups of `C = context_parallel_size`
consecutive ranks. The processes of a group draw the same prompts (`GroupRepeatSampler`), the same noise (global
sample indices count data-parallel ranks: `DataParallelLayout.rank`) and so the same samples; their denoiser shards
each sample's sequence with diffusers' hooks (`enable_context_parallel`: the plan splits the inputs, attention sees the
whole sequence through Ulysses all-to-alls or ring passes, the output is gathered), so every process of the group
holds the whole prediction, and the same loss.

Gradients: the gather's backward keeps each process's own part of the output gradient, so a process's parameter
gradient covers its own tokens, and the whole gradient of a sample is the sum over its group. DDP and FSDP average over
all `W` processes, `1 / (D * C)` of that sum, so the backward is scaled by `C` (`DataParallelLayout.grad_scale`) and
the update is the one of `D = W / C` processes without context parallelism.
"""

import contextlib

import torch
from torch.utils.data import Sampler


class DataParallelLayout:
    """Where this process sits among the data-parallel groups (`size` consecutive processes share samples)."""

    def __init__(self, accelerator, context_parallel_size: int = 1):
        self.accelerator = accelerator
        self.context_parallel_size = context_parallel_size
        self.rank = accelerator.process_index // context_parallel_size
        self.size = accelerator.num_processes // context_parallel_size
        self.grad_scale = float(context_parallel_size)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`accelerate.utils.gather`, each data-parallel group's rows once (its processes hold the same rows)."""
        from accelerate.utils import gather

        gathered = gather(tensor)
        if self.context_parallel_size == 1:
            return gathered
        per_group = gathered.unflatten(0, (self.size, self.context_parallel_size, tensor.shape[0]))
        return per_group[:, 0].flatten(0, 1)


class GroupRepeatSampler(Sampler):
    """Each block of `block_size` consecutive indices of `sampler`, `repeats` times in a row.

    accelerate deals the dataloader's batches round-robin to the processes, batch `k` to process `k % W`. With blocks
    of one dataloader batch repeated `C` times, the `C` consecutive processes of a context-parallel group get the same
    batch, and `sampler` (sized for the `W / C` data-parallel groups) is consumed as without context parallelism.
    """

    def __init__(self, sampler, block_size: int, repeats: int):
        self.sampler = sampler
        self.block_size = block_size
        self.repeats = repeats

    @classmethod
    def wrap(cls, sampler, block_size: int, repeats: int):
        """`sampler` itself without context parallelism (`repeats` 1)."""
        return sampler if repeats == 1 else cls(sampler, block_size, repeats)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        block = []
        for index in self.sampler:
            block.append(index)
            if len(block) == self.block_size:
                for _ in range(self.repeats):
                    yield from block
                block = []
        for _ in range(self.repeats if block else 0):
            yield from block

    def __len__(self) -> int:
        return len(self.sampler) * self.repeats


def context_parallel_plan(adapter) -> dict | None:
    """The denoiser's plan: the adapter's own (`cp_plan`, for a family diffusers has none for), else diffusers'."""
    return getattr(adapter, "cp_plan", None) or getattr(type(adapter.denoiser), "_cp_plan", None)


def check_context_parallel_support(adapter, args) -> None:
    """Refuse early (before training starts) what diffusers' context parallelism cannot run."""
    size = args.context_parallel_size
    if size == 1:
        return
    denoiser = adapter.denoiser
    name = type(denoiser).__name__
    if context_parallel_plan(adapter) is None:
        raise ValueError(
            f"context_parallel_size={size}: the denoiser {name} ({type(adapter.pipeline).__name__}) has no context "
            "parallel plan (diffusers' `_cp_plan`), so its sequence cannot be split. Set context_parallel_size=1 and "
            "use FSDP2 (examples/accelerate/fsdp.yaml) to fit it, or a family with a plan (FLUX, FLUX.2, Qwen-Image, "
            "Wan, LTX-Video)."
        )
    kinds = getattr(adapter, "context_parallel_types", ("ulysses", "ring"))
    if args.context_parallel_type not in kinds:
        raise ValueError(
            f"context_parallel_type={args.context_parallel_type!r}: {name}'s context parallel plan supports "
            f"{' and '.join(repr(kind) for kind in kinds)} only. Set context_parallel_type={kinds[0]!r}."
        )
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if args.context_parallel_type == "ulysses" and heads is not None and heads % size:
        raise ValueError(
            f"context_parallel_type='ulysses' splits the attention heads over the group: {name} has {heads} heads, "
            f"not a multiple of context_parallel_size={size}. Choose a divisor of {heads}, or 'ring' (CUDA)."
        )


@contextlib.contextmanager
def _one_device_count_on_cpu(device: torch.device):
    """diffusers' `_resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is 0 on a
    CPU-only machine; the device it derives is only recorded. On CPU, count one device while it runs."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(denoisers, adapter, size: int, kind: str, device: torch.device) -> None:
    """Split the sequence of each of `denoisers` (the policy, and a reference copy if any) over groups of `size`
    consecutive processes, with `ContextParallelConfig(ulysses_degree=size)` or `(ring_degree=size)`.

    The device mesh is `(data, ring, ulysses)` over the whole world, so that the context-parallel groups are the
    consecutive ranks the data layout assumes. A collective: every process calls it, in the same order.
    """
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    ring, ulysses = (size, 1) if kind == "ring" else (1, size)
    for denoiser in denoisers:
        mesh = init_device_mesh(
            device.type, (world // size, ring, ulysses), mesh_dim_names=("data", "ring", "ulysses")
        )
        if kind == "ring":
            # diffusers' native SDPA backend returns no log-sum-exp, which the ring merge needs; torch's flash kernel
            # (CUDA, half precision) does
            denoiser.set_attention_backend("_native_flash")
        config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh)
        with _one_device_count_on_cpu(device):
            denoiser.enable_parallelism(config=config, cp_plan=getattr(adapter, "cp_plan", None))
        if hasattr(adapter, "prepare_context_parallel"):  # what an adapter's plan cannot express (HunyuanVideo's mask)
            adapter.prepare_context_parallel(denoiser)


def setup_context_parallel(trainer, denoisers) -> DataParallelLayout:
    """The trainer's data layout; with `context_parallel_size > 1`, context parallelism on each of `denoisers` (the
    policy, and the reference copy when there is one: `None`s are skipped)."""
    args = trainer.args
    layout = DataParallelLayout(trainer.accelerator, args.context_parallel_size)
    if args.context_parallel_size > 1:
        denoisers = [denoiser for denoiser in denoisers if denoiser is not None]
        enable_context_parallel(
            denoisers,
            trainer.adapter,
            args.context_parallel_size,
            args.context_parallel_type,
            trainer.accelerator.device,
        )
    return layout
