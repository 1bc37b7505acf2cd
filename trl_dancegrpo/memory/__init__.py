"""Real-size memory and FLOPs estimates of a recipe on fake tensors (`trl-dancegrpo estimate-memory`)."""

from .._lazy import lazy_attributes


# imported on first use: `trl-dancegrpo estimate-memory` checks its options (report.py) before torch is imported
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {"MemoryEstimate": ".estimate", "estimate_memory": ".estimate", "format_report": ".report", "to_json": ".report"},
)


__all__ = ["MemoryEstimate", "estimate_memory", "format_report", "to_json"]
