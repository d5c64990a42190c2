"""castlens: an interpretability workbench for in-context-learning steering vectors on TransformerLens.

Data flows one way: models and tasks/prompts -> activations -> vectors -> geometry or steering -> evaluation ->
experiments -> plots; ``reuse`` (shared prefixes, last-token sweeps) serves activations and evaluation,
``selection`` chooses source samples, ``compose`` holds Steer2Adapt's library algebra and search, and
``castlens.experiments`` the runs built on one protocol (transfer, the selection study, Steer2Adapt, the
analysis). Importing castlens is cheap: torch and transformer_lens load only when a function that needs them is
used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "castlens.models", "load_hf": "castlens.models", "DEFAULT_MODEL": "castlens.models",
    "TINY_MODEL": "castlens.models", "ModelError": "castlens.models",
    "load_task": "castlens.tasks", "list_tasks": "castlens.tasks", "Task": "castlens.tasks",
    "Example": "castlens.tasks", "TaskError": "castlens.tasks", "BUILTIN_TASKS": "castlens.tasks",
    "CAST_SOURCES": "castlens.tasks", "CAST_TARGETS": "castlens.tasks",
    "PromptFormat": "castlens.prompts", "contrastive_pairs": "castlens.prompts",
    "last_token_resid": "castlens.activations", "tokenize": "castlens.activations",
    "SteeringVector": "castlens.vectors", "compute_vectors": "castlens.vectors",
    "save_vectors": "castlens.vectors", "load_vectors": "castlens.vectors", "VectorFileError": "castlens.vectors",
    "default_format": "castlens.prompts", "model_name": "castlens.models",
    "option_logprobs": "castlens.evaluation", "generate": "castlens.steering",
    "prefix_option_logprobs": "castlens.reuse", "prefix_last_token_resid": "castlens.reuse",
    "contrastive_differences": "castlens.vectors", "vector_from_prompts": "castlens.vectors",
    "TransferConfig": "castlens.experiments.transfer", "run_transfer": "castlens.experiments.transfer",
    "StudyConfig": "castlens.experiments.selection_study", "run_study": "castlens.experiments.selection_study",
    "ComposeConfig": "castlens.experiments.compose", "run_compose": "castlens.experiments.compose",
    "tune_and_test": "castlens.experiments.protocol", "Run": "castlens.experiments.run",
    "regenerate": "castlens.experiments",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'castlens' has no attribute {name!r}")


__all__ = list(_EXPORTS) + ["__version__"]
