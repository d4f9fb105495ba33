"""Transition shim: admm_kernels.bench still imports the shared argument groups from here. Their home is
admm_kernels/cli/common.py (and methods/options.py for parse_option_value); remove this module once bench
imports them from there."""

from .cli.common import (  # noqa: F401
    CALIB_TEXT_DEFAULT,
    EMBEDDED_EVAL_WINDOWS,
    EMBEDDED_NSAMPLES,
    EMBEDDED_SEQLEN,
    EVAL_TEXT_DEFAULT,
    THREADS_HELP,
    add_calibration_arguments,
    add_eval_text_argument,
    add_eval_windows_argument,
    add_run_arguments,
    deprecated_alias,
    hf_progress_bars,
    positive,
    set_threads,
)
from .methods.options import parse_option_value  # noqa: F401
