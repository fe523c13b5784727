"""mechicl: mechanistic interpretability of in-context learning on hooked transformer models.

The package is layered; each layer imports only from the layers before it:

1. :mod:`mechicl.model`: loading models, the per-head :class:`HookedModel`, masks, tokens.
2. :mod:`mechicl.inputs`: ICL tasks and their prompts, prompt pairs for patching.
3. :mod:`mechicl.results` (the result folder protocol, :func:`load_result`) and
   :mod:`mechicl.plotting` (figures of results).
4. :mod:`mechicl.analyses`: one module per analysis, each registered once
   (:data:`ANALYSES`): its options, run function, result type and memory model.
5. :mod:`mechicl.experiments`: grid files, the result store, the runner and its executors,
   memory budgets, checkpoint sweeps, command-line outputs; :mod:`mechicl.interop`: the
   lm-evaluation-harness adapter and result files.
6. :mod:`mechicl.report`: the paper report, built through the result store.
7. :mod:`mechicl.cli`: the ``mechicl`` command, generated from the registry.

This namespace re-exports the user-level verbs and result types; everything else stays
importable from its module. ``docs/architecture.md`` shows how data flows and how to add an
analysis. :mod:`mechicl.testing` has the tiny models for tests.

Axis names used across the package (in jaxtyping shapes and einops patterns):
``layer head kv_head batch pos query_pos key_pos seed d_model d_head d_vocab``.
"""

from mechicl._version import __version__
from mechicl.analyses import ANALYSES, Analysis, Job, Option, overlap, register_analysis
from mechicl.analyses.attribution import agreement, attribution_patch
from mechicl.analyses.evaluation import EvalResult, evaluate, evaluate_masks
from mechicl.analyses.importance import ffn_importance, head_importance
from mechicl.analyses.induction import ScanResult, induction_scan
from mechicl.analyses.overlap import OverlapTable
from mechicl.analyses.patching import PatchResult, patch
from mechicl.analyses.path_patching import path_patch
from mechicl.analyses.pruning import PruneCurve, prune_curve
from mechicl.experiments.grid import load_grid
from mechicl.experiments.runner import run_grid, run_jobs
from mechicl.experiments.store import ResultStore
from mechicl.inputs.pairs import PromptPairs, ioi_pairs, make_pairs
from mechicl.inputs.tasks import (
    Prompt,
    Task,
    build_prompts,
    load_task,
    register_task,
    task_from_file,
)
from mechicl.model.hooked import HookedModel, as_hooked_model
from mechicl.model.loading import ModelNotAvailableError, load_model
from mechicl.model.masks import Mask
from mechicl.plotting import head_heatmap, save_figure
from mechicl.report import Report, ReportConfig, build_report
from mechicl.results import HeadScores, LayerScores, load_result

__all__ = [
    "ANALYSES",
    "Analysis",
    "EvalResult",
    "HeadScores",
    "HookedModel",
    "Job",
    "LayerScores",
    "Mask",
    "ModelNotAvailableError",
    "Option",
    "OverlapTable",
    "PatchResult",
    "Prompt",
    "PromptPairs",
    "PruneCurve",
    "Report",
    "ReportConfig",
    "ResultStore",
    "ScanResult",
    "Task",
    "__version__",
    "agreement",
    "as_hooked_model",
    "attribution_patch",
    "build_prompts",
    "build_report",
    "evaluate",
    "evaluate_masks",
    "ffn_importance",
    "head_heatmap",
    "head_importance",
    "induction_scan",
    "ioi_pairs",
    "load_grid",
    "load_model",
    "load_result",
    "load_task",
    "make_pairs",
    "overlap",
    "patch",
    "path_patch",
    "prune_curve",
    "register_analysis",
    "register_task",
    "run_grid",
    "run_jobs",
    "save_figure",
    "task_from_file",
]
