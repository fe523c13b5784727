"""mechicl: mechanistic interpretability of in-context learning on hooked transformer models.

Axis names used across the package (in jaxtyping shapes and einops patterns):
``layer head kv_head batch pos query_pos key_pos seed d_model d_head d_vocab``.
"""

from mechicl.attribution import Agreement, agreement, attribution_patch
from mechicl.checkpoints import (
    Checkpoint,
    checkpoint_table,
    hub_checkpoints,
    identical_groups,
    local_checkpoints,
)
from mechicl.evaluation import (
    EvalResult,
    answer_batch,
    answer_losses,
    choice_logprobs,
    evaluate,
    masked_choice_logprobs,
)
from mechicl.importance import ffn_importance, head_importance
from mechicl.induction import (
    SCORES,
    ScanResult,
    copying_scores,
    duplicate_token_scores,
    induction_scan,
    ov_eigen_copying_scores,
    prefix_matching_scores,
    previous_token_scores,
)
from mechicl.masks import ActivationMeans, Mask, mean_activations
from mechicl.models import (
    BUILTIN_MODELS,
    FoldedWeights,
    HookedModel,
    ModelNotAvailableError,
    as_hooked_model,
    cache_dir,
    convert_gguf,
    load_model,
)
from mechicl.pairs import (
    PromptPairs,
    capital_pairs,
    colored_objects_pairs,
    ioi_pairs,
    make_pairs,
    register_pairs,
    repeated_token_pairs,
)
from mechicl.patching import TARGETS, PatchResult, patch
from mechicl.path_patching import path_patch
from mechicl.plotting import head_heatmap, save_figure
from mechicl.pruning import PruneCurve, prune_curve
from mechicl.results import HeadScores, LayerScores
from mechicl.tasks import (
    Example,
    Prompt,
    Task,
    build_prompts,
    hub_task,
    load_task,
    register_task,
    task_from_dataset,
    task_from_file,
)
from mechicl.tokens import FrequencyRanking, frequency_ranking

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "PatchResult",
    "PromptPairs",
    "TARGETS",
    "agreement",
    "attribution_patch",
    "capital_pairs",
    "colored_objects_pairs",
    "ioi_pairs",
    "make_pairs",
    "patch",
    "path_patch",
    "register_pairs",
    "repeated_token_pairs",
    "Checkpoint",
    "checkpoint_table",
    "hub_checkpoints",
    "identical_groups",
    "local_checkpoints",
    "ActivationMeans",
    "LayerScores",
    "Mask",
    "PruneCurve",
    "answer_losses",
    "ffn_importance",
    "head_importance",
    "masked_choice_logprobs",
    "mean_activations",
    "prune_curve",
    "BUILTIN_MODELS",
    "EvalResult",
    "Example",
    "FoldedWeights",
    "FrequencyRanking",
    "HeadScores",
    "HookedModel",
    "ModelNotAvailableError",
    "Prompt",
    "SCORES",
    "ScanResult",
    "Task",
    "answer_batch",
    "__version__",
    "as_hooked_model",
    "build_prompts",
    "cache_dir",
    "choice_logprobs",
    "convert_gguf",
    "copying_scores",
    "duplicate_token_scores",
    "evaluate",
    "frequency_ranking",
    "head_heatmap",
    "hub_task",
    "induction_scan",
    "load_model",
    "load_task",
    "ov_eigen_copying_scores",
    "prefix_matching_scores",
    "previous_token_scores",
    "register_task",
    "save_figure",
    "task_from_dataset",
    "task_from_file",
]
