"""Whole-model pruning of transformers causal LMs: block discovery, input capture, the block-by-block
pipeline (`prune_model`, its settings `PruneConfig`) with resumable state, distributed (torchrun) and
streamed execution (`StreamedModel`), and model loading (incl. the embedded SmolLM2 default)."""

from .config import PruneConfig
from .discovery import find_blocks, get_weight, is_prunable, prunable_layers, set_weight
from .loading import default_model_path, load_model, max_positions
from .pipeline import default_state_dir, prune_model
from .streaming import StreamedModel

__all__ = ["PruneConfig", "StreamedModel", "default_model_path", "default_state_dir", "find_blocks",
           "get_weight", "is_prunable", "load_model", "max_positions", "prunable_layers", "prune_model",
           "set_weight"]
