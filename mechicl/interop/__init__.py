"""Interoperability with other evaluation tools.

:mod:`mechicl.interop.lm_eval`: lm-evaluation-harness's result layout (``results`` JSON with
``acc``, ``acc_norm`` and their standard errors, per-sample JSONL) for mechicl evaluations, and an
lm-evaluation-harness ``LM`` adapter that runs any lm-eval task on a (masked, pruned or patched)
:class:`~mechicl.HookedModel`. lm-evaluation-harness itself is an optional dependency
(``pip install mechicl[lm-eval]``), imported only when the adapter is built.
"""

__all__: list[str] = []
