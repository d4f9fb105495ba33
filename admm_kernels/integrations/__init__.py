"""Adapters to other tools, each an optional extra imported only when used:

- `admm_kernels.integrations.llmcompressor`: `ADMMPruningModifier` for llm-compressor's `oneshot`
  (`pip install admm_kernels[llmcompressor]`).
- `admm_kernels.integrations.lm_eval`: zero-shot accuracy with EleutherAI's lm-evaluation-harness on an
  in-memory model (`pip install admm_kernels[eval]`; `ak.evaluate_tasks`, `admm-prune eval --tasks`).

Importing this package imports neither tool.
"""
