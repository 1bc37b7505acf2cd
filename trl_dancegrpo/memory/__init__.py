"""Real-size memory and FLOPs estimates of a recipe on fake tensors (`trl-dancegrpo estimate-memory`)."""

from .estimate import MemoryEstimate, estimate_memory
from .report import format_report, to_json


__all__ = ["MemoryEstimate", "estimate_memory", "format_report", "to_json"]
