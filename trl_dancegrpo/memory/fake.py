"""Running real-size models on a CPU without memory: fake tensors, CUDA's autocast policy, flash attention, a tracker of
the bytes alive.

Fake tensors (`torch._subclasses.fake_tensor`) carry shapes, dtypes and devices but no data, so the real model code
runs at any size on a laptop. What a GPU run would differ in, and is fixed here:

- a model is built on the meta device and its parameters and buffers are replaced by fake CPU tensors by direct
  assignment (`Module.to()` cannot swap to fake tensors); fake CUDA tensors cannot run a backward without a GPU;
- CPU autocast casts other ops than CUDA autocast (on CUDA, layer_norm, softmax, pow, exp, sum... run in float32 under
  bf16 autocast), which changes what autograd saves: `cuda_autocast_policy()` makes CPU autocast follow CUDA's lists;
- `F.scaled_dot_product_attention` on CPU takes the math path, which saves the whole attention matrix; a GPU uses a
  flash / memory-efficient kernel, which saves q, k, v, the output and a float32 logsumexp: `flash_attention()` routes
  it to the CPU flash kernel, which saves the same.
"""

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


# CUDA autocast's lower-precision ops (aten/src/ATen/autocast_mode.cpp); its other ops run in float32, except the
# "promote" ones (widest input dtype, which is what type promotion does anyway).
_LOWER_PRECISION = {
    "_convolution",
    "_convolution.deprecated",
    "_scaled_dot_product_flash_attention",
    "_thnn_fused_gru_cell",
    "_thnn_fused_lstm_cell",
    "addbmm",
    "addmm",
    "addmv",
    "addr",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "cudnn_convolution",
    "cudnn_convolution_transpose",
    "einsum",
    "gru_cell",
    "linalg_multi_dot",
    "linalg_vecdot",
    "linear",
    "lstm_cell",
    "matmul",
    "mm",
    "mv",
    "prelu",
    "rnn_relu_cell",
    "rnn_tanh_cell",
    "scaled_dot_product_attention",
}
_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put", "scatter_add"}
_PROMOTE |= {"tensordot", "vdot"}
# CPU-only autocast ops that reach CUDA's policy through their decomposition: left to CPU autocast
_DECOMPOSED_ON_CUDA = {"conv1d.padding", "conv2d.padding", "conv3d.padding", "_addmm_activation"}
_DECOMPOSED_ON_CUDA |= {"_native_multi_head_attention", "mkldnn_rnn_layer"}


def _autocast_ops(dispatch_key: str) -> set[str]:
    import re

    pattern = re.compile(rf"^{dispatch_key}: registered at \S*autocast_mode", re.M)
    return {
        name.removeprefix("aten::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and pattern.search(torch._C._dispatch_dump(name))
    }


def _op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _kernel(op, cast_to: str | None):
    """An AutocastCPU kernel: cast floating inputs (to float32, to the autocast dtype, or not at all), then run `op`."""
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        if cast_to == "float32":
            target, sources = torch.float32, (torch.float16, torch.bfloat16)
        elif cast_to == "lower":
            target, sources = torch.get_autocast_dtype("cpu"), (torch.float32,)
        else:
            target, sources = None, ()

        def cast(value):
            if isinstance(value, torch.Tensor) and value.dtype in sources:
                return value.to(target)
            return value

        args, kwargs = tree_map(cast, (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within the context, CPU autocast casts exactly as CUDA autocast does (what autograd saves then matches a GPU).

    Kernels are registered at the `AutocastCPU` dispatch key for the ops whose policy differs; they are removed on
    exit (the library object owns them).
    """
    import warnings

    cuda_ops, cpu_ops = _autocast_ops("AutocastCUDA"), _autocast_ops("AutocastCPU")
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in sorted(cuda_ops):
            if name in _PROMOTE or (name in _LOWER_PRECISION and name in cpu_ops):
                continue  # same on CPU; CPU's own kernel keeps autocast's weight-cast cache
            library.impl(name, _kernel(_op(name), "lower" if name in _LOWER_PRECISION else "float32"), "AutocastCPU")
        for name in sorted(cpu_ops - cuda_ops - _DECOMPOSED_ON_CUDA):
            library.impl(name, _kernel(_op(name), None), "AutocastCPU")  # CUDA runs these in the input dtype
    try:
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def flash_attention():
    """Route `F.scaled_dot_product_attention` to the CPU flash kernel, which saves what a GPU's fused kernels save."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p or enable_gqa or query.ndim != 4:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        else:
            key, value = key.to(query.dtype), value.to(query.dtype)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(query.dtype)
        elif attn_mask is not None:  # the kernel takes an additive mask
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def make_fake(module: torch.nn.Module, fake_mode, device: str = "cpu") -> torch.nn.Module:
    """Replace every parameter and buffer of a meta-device `module` by a fake tensor on `device`, in place.

    `requires_grad`, dtypes and shapes are kept; tied parameters stay tied.
    """
    replaced = {}  # id -> (original, replacement); the original is kept alive so that its id is not reused

    def replacement(tensor, make):
        if id(tensor) not in replaced:
            with fake_mode:
                fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            replaced[id(tensor)] = (tensor, make(fake))
        return replaced[id(tensor)][1]

    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None:
                make = lambda fake, p=param: torch.nn.Parameter(fake, requires_grad=p.requires_grad)  # noqa: E731
                submodule._parameters[name] = replacement(param, make)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = replacement(buffer, lambda fake: fake)
    return module


class LiveMemory(TorchDispatchMode):
    """Counts the bytes of the tensor storages created while it is active and still alive, their peak, and FLOPs.

    Storages that existed before (parameters, inputs, views of them) are never counted. `reset_peak()` starts a new
    peak from what is alive now. FLOPs use the formulas of `torch.utils.flop_counter` (matmuls, convolutions,
    attention kernels); its `FlopCounterMode` itself is not used: its module hooks keep tensors alive that gradient
    checkpointing would free, which inflates the memory count several times.
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._flop_formulas = flop_registry
        self.flops = 0
        self.live = 0
        self.peak = 0
        self.weight_casts = 0  # bytes of copies of trainable parameters (autocast's cached casts of float32 weights)
        self._tracked = WeakIdKeyDictionary()
        self._external = WeakIdKeyDictionary()

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def _see_input(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage not in self._tracked and storage not in self._external:
            self._external[storage] = True

    def _track_output(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._tracked or storage in self._external:
            return
        nbytes = storage.nbytes()
        self._tracked[storage] = weakref.ref(storage, lambda ref, n=nbytes: self._free(n, ref))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tree_map_only(torch.Tensor, self._see_input, (args, kwargs))
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track_output, out)
        if (
            func is torch.ops.aten._to_copy.default
            and isinstance(args[0], torch.nn.Parameter)
            and args[0].requires_grad
        ):
            self.weight_casts += out.numel() * out.element_size()
        formula = self._flop_formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        elif func._overloadpacket in _CPU_FLASH_MATMULS:
            # the CPU flash kernel (see `flash_attention`) is not in torch's table: 2 matmuls forward, 5 backward
            # (the scores are recomputed), 2 * b * h * q * k * d FLOPs each, as torch counts the GPU kernels
            query, key = args[1:3] if func._overloadpacket is _CPU_FLASH_BACKWARD else args[:2]
            batch, heads, queries, dim = query.shape
            self.flops += _CPU_FLASH_MATMULS[func._overloadpacket] * 2 * batch * heads * queries * key.shape[-2] * dim
        return out


_CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_CPU_FLASH_MATMULS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: 2, _CPU_FLASH_BACKWARD: 5}


# Outputs of ops on real tensors up to this many elements are computed for real (token ids, masks, grids, positions).
REAL_VALUES_MAX_ELEMENTS = 2**20


class RealValues(TorchDispatchMode):
    """Keeps the values that do not depend on weights real inside a fake-tensor run.

    Fake tensors hold no values, so code that takes shapes from values fails under them: a prompt encoder that keeps
    each prompt's own tokens (`hidden[mask]`, `split(hidden, mask.sum(1).tolist())`), a vision tower that cuts its
    attention by the image grid (`cu_seqlens.tolist()`). Those values come from the tokenizer, the processor and
    small index tensors, never from weights. Under this mode (entered inside a `FakeTensorMode` with
    `allow_non_fake_inputs=True`):

    - an op whose tensor inputs are all real (not fake, not on the meta device) runs for real when its output is small (at most
      `REAL_VALUES_MAX_ELEMENTS` elements per tensor), so masks, token counts and positions keep their values; larger
      outputs stay fake (no memory); an op whose output shape depends on values (nonzero, `.tolist()`) runs for real;
    - broadcasting a real tensor that holds one value (`expand`), and a comparison or `all`/`any` of such broadcast
      scalars (the all-zero image tokens HunyuanVideo 1.5 takes for text-to-video), run for real whatever their size,
      as code branches on them;
    - indexing a fake tensor with a real boolean mask (a shape from values) indexes with the mask's real positions.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(tensor, FakeTensor) or tensor.is_meta for tensor in _tensor_arguments(args, kwargs)):
            if func in _INDEXING and any(_is_real_mask(index) for index in args[1]):
                args = (args[0], _mask_positions(args[1]), *args[2:])
            return func(*args, **kwargs)
        try:
            shapes = func(*args, **kwargs)  # fake: the output's shape, no values
        except (DynamicOutputShapeException, DataDependentOutputException):
            shapes = None
        outputs = shapes if isinstance(shapes, (tuple, list)) else (shapes,)
        broadcast = func._overloadpacket in _BRANCH_TESTS and all(
            tensor.untyped_storage().nbytes() <= tensor.element_size() for tensor in _tensor_arguments(args, kwargs)
        )
        if (
            shapes is None
            or broadcast
            or all(
                not isinstance(output, torch.Tensor) or output.numel() <= REAL_VALUES_MAX_ELEMENTS
                for output in outputs
            )
        ):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return shapes


def _tensor_arguments(args, kwargs):
    """The tensors among an op's arguments (aten ops take tensors directly or in one list, e.g. `cat`)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


# ops that stay real on broadcast scalars whatever their size: the broadcast itself (a view) and the tests code
# branches on (their boolean outputs are cheap)
_BRANCH_TESTS = {torch.ops.aten.expand, torch.ops.aten.eq, torch.ops.aten.ne, torch.ops.aten.all, torch.ops.aten.any}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


def _is_real_mask(index) -> bool:
    return (
        isinstance(index, torch.Tensor)
        and not isinstance(index, FakeTensor)
        and index.dtype in (torch.bool, torch.uint8)
    )


def _mask_positions(indices) -> list:
    """Boolean masks among `aten.index` indices replaced by the positions they select (one index per masked dim)."""
    replaced = []
    for index in indices:
        if _is_real_mask(index):
            with unset_fake_temporarily():
                replaced.extend(index.bool().nonzero().unbind(1))
        else:
            replaced.append(index)
    return replaced
