"""The analyses layer: one module per analysis, each declaring itself once in the registry.

========================  ==========================================  =====================
analysis (CLI command)    module                                      result type
========================  ==========================================  =====================
``scan``                  :mod:`~mechicl.analyses.induction`          ``ScanResult``
``accuracy`` (``eval``)   :mod:`~mechicl.analyses.evaluation`         ``EvalResult``
``importance``            :mod:`~mechicl.analyses.importance`         ``HeadScores``
``ffn_importance``        :mod:`~mechicl.analyses.importance`         ``LayerScores``
``pruning`` (``prune``)   :mod:`~mechicl.analyses.pruning`            ``PruneCurve``
``patching`` (``patch``)  :mod:`~mechicl.analyses.patching`           ``PatchResult``
``path_patching``         :mod:`~mechicl.analyses.path_patching`      ``PatchResult``
``attribution``           :mod:`~mechicl.analyses.attribution`        ``PatchResult``
``overlap``               :mod:`~mechicl.analyses.overlap`            ``OverlapTable``
``answer_attribution``    :mod:`~mechicl.analyses.recall`             ``AnswerAttribution``
``value_scaling``         :mod:`~mechicl.analyses.recall`             ``ValueScaling``
``answer_determinants``   :mod:`~mechicl.analyses.recall`             ``AnswerDeterminants``
``sparsity_curves``       :mod:`~mechicl.analyses.sparsity`           ``SparsityCurves``
``circuit_reuse``         :mod:`~mechicl.analyses.circuit_reuse`      ``CircuitReuse``
========================  ==========================================  =====================

:mod:`~mechicl.analyses.causal` registers ``induction_ablation`` (``ablate-induction``) and
``induction_ablation_task`` (``ablate-induction-task``), both ``InductionAblation``: the top-k
heads of an induction score ablated against k random heads.

Their CLI commands: ``answer-attribution``, ``value-scaling``, ``answer-determinants``, ``sparsity``,
``circuit-reuse``.

(``report``, registered by :mod:`mechicl.report`, composes them.) Support modules:
:mod:`~mechicl.analyses.metrics` (patching metrics), :mod:`~mechicl.analyses.icl` (is a task
in-context learning: above chance, paired in-context gain) and the declared private modules
``_registry`` (the :class:`Analysis` record, :class:`Option`, :class:`Job`) and ``_engine``
(batched patched copies shared by the three patching analyses).

Importing this package registers every analysis in :data:`ANALYSES`.
"""

from mechicl.analyses import (
    attribution,
    causal,
    circuit_reuse,
    evaluation,
    icl,
    importance,
    induction,
    metrics,
    overlap,
    patching,
    path_patching,
    pruning,
    recall,
    sparsity,
)
from mechicl.analyses._registry import (
    ANALYSES,
    MEMORY_MODELS,
    Analysis,
    Call,
    Job,
    Option,
    OptionError,
    Outputs,
    batch_tokens_option,
    get_analysis,
    job_stem,
    options_markdown,
    options_table,
    register_analysis,
    task_slug,
)

__all__ = [
    "ANALYSES",
    "MEMORY_MODELS",
    "Analysis",
    "Call",
    "Job",
    "Option",
    "OptionError",
    "Outputs",
    "attribution",
    "batch_tokens_option",
    "causal",
    "circuit_reuse",
    "evaluation",
    "get_analysis",
    "icl",
    "importance",
    "induction",
    "job_stem",
    "metrics",
    "options_markdown",
    "options_table",
    "overlap",
    "patching",
    "path_patching",
    "pruning",
    "recall",
    "register_analysis",
    "sparsity",
    "task_slug",
]
