"""Let accelerate run FSDP in CPU processes (gloo), for the tests: accelerate turns FSDP on only for GPU-like devices.

Imported before the trainer is built, in processes started by `accelerate launch --use_fsdp` with
`ACCELERATE_USE_CPU=true`; the sharding itself is torch's (FSDP2 `fully_shard` over a CPU device mesh).
"""

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


_init = state.AcceleratorState.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and getattr(self, "fsdp_plugin", None) is None:
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # from the launcher's env
        # AcceleratorState copies PartialState's fields each time it is built: set the type in both
        state.PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_with_fsdp
