"""Method option values given as text: `admm-prune prune -o KEY=VALUE` and bench's NAME:KEY=VALUE.

Beside the method registry (registry.py) because both front ends hand the parsed values to the methods'
own option checks; this module only turns text into Python values.
"""

from __future__ import annotations

import torch

# The short dtype names accepted besides torch's own attribute names; the same aliases as the model
# loader's dtype names (models/loading.py), which sits above this package and so cannot be imported here.
DTYPE_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}


def _dtype_value(key: str, text: str) -> torch.dtype:
    name = text[len("torch."):] if text.startswith("torch.") else text
    value = getattr(torch, name, None)
    if isinstance(value, torch.dtype):
        return value
    if name in DTYPE_ALIASES:
        return DTYPE_ALIASES[name]
    raise ValueError(f"option {key}={text!r}: not a torch dtype (e.g. float32, float64, torch.bfloat16)")


def parse_option_value(key: str, text: str) -> object:
    """The Python value of method option `key` given as `text`: a torch.dtype for keys ending in "dtype"
    and for values "torch.NAME" (e.g. compute_dtype=float64), else int, then float, then
    true/false/none, else the text itself. ValueError naming the option for a bad dtype."""
    value = text.strip()
    if key.endswith("dtype") or value.startswith("torch."):
        return _dtype_value(key, value)
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)
