"""The model layer: loading a model, the uniform per-head view of its bridge, head / FFN masks,
and token frequency rankings. Everything above it (inputs, analyses, experiments, the report)
takes a :class:`HookedModel`.

Modules: :mod:`~mechicl.model.loading` (built-in offline models, folders, ``.gguf`` files, hub
ids, device placement), :mod:`~mechicl.model.hooked` (:class:`HookedModel`),
:mod:`~mechicl.model.masks` (:class:`Mask`), :mod:`~mechicl.model.sparsity` (weight pruning in
place: :func:`pruned`), :mod:`~mechicl.model.tokens`.
"""

from mechicl.model.hooked import (
    HOOK_KINDS,
    FoldedWeights,
    HookedModel,
    as_hooked_model,
    weights_description,
)
from mechicl.model.loading import (
    BUILTIN_MODELS,
    ModelNotAvailableError,
    cache_dir,
    convert_gguf,
    default_device,
    load_model,
    parse_bytes,
)
from mechicl.model.masks import ActivationMeans, Mask, mean_activations
from mechicl.model.sparsity import Pruning, calibration_batch, prunable_weights, pruned
from mechicl.model.tokens import FrequencyRanking, frequency_ranking

__all__ = [
    "BUILTIN_MODELS",
    "HOOK_KINDS",
    "ActivationMeans",
    "FoldedWeights",
    "FrequencyRanking",
    "HookedModel",
    "Mask",
    "Pruning",
    "ModelNotAvailableError",
    "as_hooked_model",
    "calibration_batch",
    "cache_dir",
    "convert_gguf",
    "default_device",
    "frequency_ranking",
    "load_model",
    "mean_activations",
    "parse_bytes",
    "prunable_weights",
    "pruned",
    "weights_description",
]
