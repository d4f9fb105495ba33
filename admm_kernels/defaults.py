"""The embedded default run's sizes and the names reports give the default texts: defined once here for
the library run (admm_kernels.run), the command line (admm_kernels.cli) and bench.

The embedded default run (no model given): SmolLM2-135M, 30 blocks, on 2 CPU cores. Measured 2026-11-28 on
the project's 2-core machine while other jobs ran (load ~5, --threads 1): 6 min 50 s wall, 4 min 17 s CPU:
load 12 s, tokenise 10 s, perplexity 2 x ~50 s (32 windows of 256 tokens, ~1.5 s each), pruning 270 s =
forward passes 102 s + Gram 32 s + ADMM solves 134 s (32 x 256 = 8k calibration tokens, ~9 s per block).
Twice the calibration tokens would add ~130 s of forward passes and Gram.
"""

EMBEDDED_NSAMPLES = 32      # calibration windows of the embedded run
EMBEDDED_SEQLEN = 256       # tokens per calibration / evaluation window of the embedded run
EMBEDDED_EVAL_WINDOWS = 32  # evaluation windows of the embedded run (default protocol)
EVAL_TEXT_DEFAULT = "shakespeare:evaluation"  # how reports name the default texts (the held-out plays)
CALIB_TEXT_DEFAULT = "shakespeare:calibration"
