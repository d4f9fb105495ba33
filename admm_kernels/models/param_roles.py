"""The role of a block's matrix parameter that is not a selected layer's weight, read from its name and
its module: the reason it stays dense in the coverage report (admm_kernels.models.coverage)."""

from __future__ import annotations

from torch import nn

from .experts import ROUTER_NAMES

SSM_NAMES = {"A_log", "A", "D", "dt_bias", "dt_proj_bias", "conv1d", "D_log"}
# The role of a matrix the block uses some other way: a candidate for admm_kernels.models.plain_params.
UNUSED_MATRIX = "not a linear layer"


def matrix_role(rel_module: str, module: nn.Module, pname: str) -> str:
    """"bias", "norm", "ssm", "conv", "router" or UNUSED_MATRIX for parameter `pname` of `module`
    (named rel_module inside its block)."""
    cls = type(module).__name__.lower()
    leaf = rel_module.rsplit(".", 1)[-1]
    if pname.endswith("bias"):  # (E, out) biases of fused experts: one vector per expert
        return "bias"
    if "norm" in cls or "norm" in leaf:
        return "norm"
    if pname in SSM_NAMES or leaf in SSM_NAMES:
        return "conv" if "conv" in leaf or "conv" in pname else "ssm"
    if isinstance(module, nn.modules.conv._ConvNd) or "conv" in cls:
        return "conv"
    if leaf in ROUTER_NAMES or "router" in cls or cls.endswith("gate"):
        return "router"
    return UNUSED_MATRIX
