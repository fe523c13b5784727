"""Plotting: layer x head heatmaps, per-layer bars, pruning curves, patching results, overlap
matrices, score scatters, per-position loss curves and scores across training checkpoints
(plotly). Functions return ``go.Figure``; saving is explicit (:func:`save_figure`).

Conventions shared by every heatmap: layer 0 at the BOTTOM, heads left to right, hover shows
layer, head and value; for grouped-query models thin lines separate the KV groups.

Axis names: ``layer head``.
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from mechicl._io import atomic_path
from mechicl.results import HeadScores, LayerScores

__all__ = ["checkpoint_figure", "head_heatmap", "kv_group_size", "layer_bars", "loss_curve",
           "matrix_heatmap", "patch_heatmap", "prune_curve_figure", "save_figure",
           "score_scatter"]


def kv_group_size(model: dict[str, Any]) -> int:
    """Query heads per KV head, from a result's model provenance (``model["shape"]``; 1 if it
    does not say), to mark the groups on layer x head figures.

    >>> kv_group_size({"shape": {"n_heads": 9, "n_kv_heads": 3}})
    3
    """
    shape = model.get("shape") or {}
    return int(shape.get("n_heads", 1)) // int(shape.get("n_kv_heads", 1) or 1)

FORMATS = ("png", "svg", "pdf", "html")


def head_heatmap(
    scores: HeadScores | Float[Tensor, "layer head"],
    *,
    title: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str = "Viridis",
    kv_group_size: int | None = None,
    colorbar_title: str = "score",
) -> go.Figure:
    """A layer x head heatmap of per-head scores.

    Args:
        scores: a :class:`~mechicl.results.HeadScores` (its mean is plotted) or a
            ``[layer, head]`` tensor.
        title: figure title (default: the score's name).
        zmin: lower end of the colour range; pass the same zmin/zmax to a set of figures for a
            consistent scale.
        zmax: upper end of the colour range.
        colorscale: plotly colour scale name.
        kv_group_size: query heads per KV head; draws group separators when > 1.
        colorbar_title: label of the colour bar.

    >>> fig = head_heatmap(torch.rand(3, 4), title="random")
    >>> fig.data[0].z.shape
    (3, 4)
    """
    mean = scores.mean if isinstance(scores, HeadScores) else scores
    if mean.ndim != 2:
        raise ValueError(f"expected [layer, head] scores, got shape {tuple(mean.shape)}")
    if title is None:
        title = scores.name if isinstance(scores, HeadScores) else ""
    z = mean.detach().to("cpu", torch.float64).numpy()
    n_layers, n_heads = z.shape
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=zmin, zmax=zmax,
        colorscale=colorscale, colorbar={"title": {"text": colorbar_title}},
        hovertemplate="layer %{y}<br>head %{x}<br>value %{z:.4f}<extra></extra>",
    ))
    if kv_group_size and kv_group_size > 1:
        for boundary in range(kv_group_size, n_heads, kv_group_size):
            fig.add_vline(x=boundary - 0.5, line={"color": "white", "width": 1})
    fig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer",
        width=max(360, 60 + 28 * n_heads + 120), height=max(320, 120 + 18 * n_layers),
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    fig.update_yaxes(autorange=True, dtick=max(1, n_layers // 15))  # layer 0 at the bottom
    fig.update_xaxes(dtick=1)
    return fig


def layer_bars(scores: LayerScores | Float[Tensor, " layer"], *, title: str | None = None,
               yaxis_title: str = "score") -> go.Figure:
    """One bar per layer (e.g. FFN importance), with +-1 standard error when ``scores`` carries
    per-example rows.

    >>> list(layer_bars(torch.tensor([0.5, -0.25, 1.0])).data[0].y)
    [0.5, -0.25, 1.0]
    """
    mean = scores.mean if isinstance(scores, LayerScores) else scores
    if mean.ndim != 1:
        raise ValueError(f"expected [layer] scores, got shape {tuple(mean.shape)}")
    error = None
    if isinstance(scores, LayerScores) and scores.per_seed.shape[0] > 1:
        sem = (scores.var / scores.per_seed.shape[0]).sqrt()
        error = {"type": "data", "array": sem.tolist()}
    fig = go.Figure(go.Bar(x=list(range(mean.shape[0])), y=mean.double().tolist(), error_y=error,
                           hovertemplate="layer %{x}<br>value %{y:.4f}<extra></extra>"))
    if title is None:
        title = scores.name if isinstance(scores, LayerScores) else ""
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=yaxis_title, width=640,
                      height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def prune_curve_figure(curve: Any, *, x: str = "head_percent", title: str | None = None,
                       ) -> go.Figure:
    """Accuracy vs percentage pruned, one line per ranking; random draws as their mean with a
    min-max band; the unpruned accuracy and chance as dashed lines.

    Args:
        curve: a :class:`~mechicl.analyses.pruning.PruneCurve`.
        x: ``"head_percent"`` or ``"ffn_percent"`` (the other percentage is held at 0).
        title: figure title.
    """
    if x not in ("head_percent", "ffn_percent"):
        raise ValueError(f"x={x!r} is not allowed; choose 'head_percent' or 'ffn_percent'")
    other = "ffn_percent" if x == "head_percent" else "head_percent"
    key = "head_ranking" if x == "head_percent" else "ffn_ranking"
    data = curve.data[curve.data[other] == 0]
    fig = go.Figure()
    for name, group in data.groupby(key, sort=True):
        if name == "none":
            continue
        stats = group.groupby(x).accuracy.agg(["mean", "min", "max"]).reset_index()
        label = f"{name} ({group.draw.nunique()} draws)" if name == "random" else str(name)
        if name == "random" and group.draw.nunique() > 1:
            fig.add_trace(go.Scatter(
                x=list(stats[x]) + list(stats[x])[::-1],
                y=list(stats["max"]) + list(stats["min"])[::-1], fill="toself",
                line={"width": 0}, fillcolor="rgba(128,128,128,0.25)", hoverinfo="skip",
                showlegend=False))
        fig.add_trace(go.Scatter(
            x=stats[x], y=stats["mean"], mode="lines+markers", name=label,
            line={"dash": "dot", "color": "gray"} if name == "random" else None,
            hovertemplate=f"{label}<br>%{{x}}% removed<br>accuracy %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=curve.baseline, line={"dash": "dash", "color": "black", "width": 1},
                  annotation_text="unpruned", annotation_position="bottom left")
    if "chance" in data and len(data):
        fig.add_hline(y=float(data.chance.iloc[0]), line={"dash": "dash", "color": "red", "width": 1},
                      annotation_text="chance", annotation_position="bottom left")
    unit = "heads" if x == "head_percent" else "FFNs"
    if title is None:
        p = curve.params
        title = f"{p.get('task', '')} {p.get('shots', '')}-shot: pruning {unit}"
    fig.update_layout(title=title, xaxis_title=f"% of {unit} removed",
                      yaxis_title="accuracy", yaxis_range=[0, 1], width=640, height=480,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    fig.update_xaxes(dtick=10)
    return fig


def patch_heatmap(result: Any, *, sum_over: str | None = None,
                  title: str | None = None, effect: bool = True) -> go.Figure:
    """A heatmap of a patching result: layer x head, layer x position, or (1-D) layers.

    Colours are centred on "no effect" (the unpatched run's score), red where patching raises
    the metric and blue where it lowers it.

    Args:
        result: a :class:`~mechicl.analyses.patching.PatchResult`.
        sum_over: for three-axis results (per head and position), the axis to sum effects over
            (``"pos"`` or ``"head"``).
        title: figure title (default: target, direction, metric).
        effect: plot ``values - baseline`` (default) instead of the values.
    """
    values = result.effect() if effect else result.values
    axes = list(result.axes)
    if len(axes) == 3:
        if sum_over not in axes or sum_over == "layer":
            raise ValueError(f"a {tuple(axes)} result needs sum_over= one of "
                             f"{[a for a in axes if a != 'layer']}")
        values = torch.nansum(values, dim=axes.index(sum_over))
        axes.remove(sum_over)
    elif sum_over is not None:
        raise ValueError(f"sum_over is only for three-axis results, this one is {tuple(axes)}")
    if len(axes) == 1:  # [layer]: one column
        values, axes = values[:, None], [axes[0], result.target]
    ylabels = [str(i) for i in range(values.shape[0])]
    if axes[0] == "sender" and "sender" in result.labels:
        ylabels = list(result.labels["sender"])
    xname = axes[1]
    xlabels = [str(i) for i in range(values.shape[1])]
    if xname == "pos" and "pos" in result.labels:
        xlabels = [f"{i}: {t!r}" for i, t in enumerate(result.labels["pos"])]
    elif xname == "sender" and "sender" in result.labels:
        xlabels = list(result.labels["sender"])
    elif xname == result.target:
        xlabels = [result.target]
    z = values.double().numpy()
    finite = values[~torch.isnan(values)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    base = 0.0 if effect else result.baseline
    fig = go.Figure(go.Heatmap(
        z=z, x=xlabels, y=ylabels, colorscale="RdBu_r", zmid=base,
        zmin=base - bound, zmax=base + bound,
        colorbar={"title": "effect" if effect else result.metric},
        hovertemplate=f"{axes[0]} %{{y}}<br>{xname} %{{x}}<br>%{{z:.4f}}<extra></extra>"))
    if title is None:
        kind = {"activation": "activation patching", "path": "path patching",
                "attribution": "attribution patching"}.get(result.method, result.method)
        norm = " (normalised)" if result.normalized and "normal" not in result.metric else ""
        title = f"{kind}: {result.target} ({result.direction})<br><sup>{result.metric}{norm}</sup>"
    fig.update_layout(title=title, xaxis_title=xname, yaxis_title=axes[0],
                      width=max(560, 28 * len(xlabels) + 200), height=max(360, 16 * len(ylabels) + 160),
                      margin={"l": 60, "r": 20, "t": 50, "b": 80})
    return fig


def matrix_heatmap(matrix: pd.DataFrame, *, title: str = "", zmin: float | None = -1.0,
                   zmax: float | None = 1.0, colorscale: str = "RdBu_r",
                   colorbar_title: str = "", fmt: str = ".2f") -> go.Figure:
    """A square (or any) matrix of statistics, e.g. from :func:`mechicl.analyses.overlap.overlap_matrix`,
    with its values written in the cells; rows top to bottom in the DataFrame's order.

    >>> import pandas as pd
    >>> fig = matrix_heatmap(pd.DataFrame([[1.0, 0.2], [0.2, 1.0]], index=["a", "b"],
    ...                                   columns=["a", "b"]))
    >>> fig.data[0].z.tolist()
    [[1.0, 0.2], [0.2, 1.0]]
    """
    z = matrix.to_numpy(dtype=float)
    rows, cols = [str(i) for i in matrix.index], [str(c) for c in matrix.columns]
    text = [[format(v, fmt) for v in row] for row in z.tolist()]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, colorscale=colorscale, zmin=zmin, zmax=zmax, text=text,
        texttemplate="%{text}", colorbar={"title": colorbar_title},
        hovertemplate="%{y} vs %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_autorange="reversed",
                      width=max(420, 60 * len(cols) + 220), height=max(360, 40 * len(rows) + 160),
                      margin={"l": 120, "r": 20, "t": 50, "b": 100})
    return fig


def score_scatter(x: HeadScores | Float[Tensor, "layer head"],
                  y: HeadScores | Float[Tensor, "layer head"], *, label_top: int = 5,
                  x_title: str | None = None, y_title: str | None = None,
                  title: str = "") -> go.Figure:
    """One point per head: score ``x`` (e.g. prefix matching) against score ``y`` (e.g. task
    importance); hover shows ``layer.head``, and the ``label_top`` highest heads of either score
    are labelled.
    """
    xs = (x.mean if isinstance(x, HeadScores) else x).detach().double().cpu()
    ys = (y.mean if isinstance(y, HeadScores) else y).detach().double().cpu()
    if xs.shape != ys.shape or xs.ndim != 2:
        raise ValueError(f"need two [layer, head] maps of one shape, got {tuple(xs.shape)} and "
                         f"{tuple(ys.shape)}")
    n_heads = xs.shape[1]
    names = [f"{i // n_heads}.{i % n_heads}" for i in range(xs.numel())]
    top = set()
    if label_top > 0:
        k = min(label_top, xs.numel())
        top = set(torch.argsort(xs.flatten(), descending=True, stable=True)[:k].tolist())
        top |= set(torch.argsort(ys.flatten(), descending=True, stable=True)[:k].tolist())
    labels = [names[i] if i in top else "" for i in range(xs.numel())]
    fig = go.Figure(go.Scatter(
        x=xs.flatten().numpy(), y=ys.flatten().numpy(), mode="markers+text", text=labels,
        textposition="top center", customdata=names, marker={"size": 6, "opacity": 0.7},
        hovertemplate="head %{customdata}<br>x %{x:.4f}<br>y %{y:.4f}<extra></extra>"))
    fig.update_layout(
        title=title,
        xaxis_title=x_title or (x.name.replace("_", " ") if isinstance(x, HeadScores) else "x"),
        yaxis_title=y_title or (y.name.replace("_", " ") if isinstance(y, HeadScores) else "y"),
        width=640, height=480, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def loss_curve(loss: HeadScores | Float[Tensor, "seed pos"],
               block_lengths: Int[Tensor, " seed"] | None = None, *, title: str = "",
               ) -> go.Figure:
    """Per-position next-token loss on repeated random sequences (induction: the loss drops
    after the first copy). ``loss[seed, i]`` predicts token ``i + 1``; NaN marks padding.

    Args:
        loss: ``[seed, pos]`` losses, or a prefix-matching ``HeadScores`` from a scan (its
            ``extras["loss_per_position"]`` and ``extras["block_length"]``).
        block_lengths: ``[seed]`` length of one copy per seed. With one common length the
            x-axis is the position and dashed lines mark the copies; otherwise positions are
            divided by each seed's length (x in copies).
        title: figure title.
    """
    if isinstance(loss, HeadScores):
        if "loss_per_position" not in loss.extras:
            raise ValueError(f"{loss.name!r} holds no per-position loss (a prefix-matching scan "
                             "result does)")
        block_lengths = loss.extras.get("block_length")
        loss = loss.extras["loss_per_position"]
    loss = loss.detach().double().cpu()
    if loss.ndim != 2:
        raise ValueError(f"loss must be [seed, pos], got shape {tuple(loss.shape)}")
    predicted = torch.arange(1, loss.shape[1] + 1, dtype=torch.float64)  # position predicted
    fig = go.Figure()
    blocks = None if block_lengths is None else block_lengths.detach().cpu().long()
    if blocks is None or bool((blocks == blocks[0]).all()):
        mean = torch.nanmean(loss, dim=0)
        fig.add_trace(go.Scatter(x=predicted.numpy(), y=mean.numpy(), mode="lines",
                                 name=f"mean over {loss.shape[0]} sequences",
                                 hovertemplate="position %{x}<br>loss %{y:.3f}<extra></extra>"))
        if blocks is not None:
            for c in range(1, int(loss.shape[1] // int(blocks[0])) + 1):
                fig.add_vline(x=c * int(blocks[0]), line={"dash": "dash", "color": "gray",
                                                          "width": 1})
        x_title = "position"
    else:
        for i in range(loss.shape[0]):
            fig.add_trace(go.Scatter(
                x=(predicted / blocks[i]).numpy(), y=loss[i].numpy(), mode="lines",
                line={"width": 1, "color": "rgba(31,119,180,0.3)"}, showlegend=False,
                hovertemplate=f"sequence {i}<br>copy %{{x:.2f}}<br>loss %{{y:.3f}}<extra></extra>"))
        x_title = "position / copy length (copies)"
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="next-token loss (nats)",
                      width=640, height=400, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig

def _si(value: int | float) -> str:
    """Compact tick label of a step: 1, 10, 100, 1k, 10k, 100k, 1M."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def checkpoint_figure(table: pd.DataFrame, *, value: str = "mean", top_k: int = 3,
                      log_x: bool = False, title: str | None = None) -> go.Figure:
    """Per-head scores across training steps: for each score, the maximum over heads at every
    step (dashed black; hover names the head) and the ``top_k`` heads of the last step as lines.

    Checkpoints whose weights equal an earlier checkpoint's (a non-null ``identical_to``) are
    circled in red on the maximum line. Several scores (a ``score`` column) give one subplot
    each, sharing the step axis.

    Args:
        table: a long table with columns ``step layer head`` and ``value``, optionally ``label``
            (the checkpoint's name, shown on hover), ``score`` and ``identical_to``; e.g. from
            :func:`mechicl.experiments.checkpoints.checkpoint_table`. One row per score, step and head.
        value: the column to plot (``"mean"``, ``"rank"``, ...).
        top_k: how many heads to draw, chosen by their value at the last step (ties: lower
            layer, then head, first); 0 draws only the maximum.
        log_x: logarithmic step axis, for schedules such as Pythia's (0, 1, 2, 4, ..., 512,
            1000, ..., 143000). Step 0 is then drawn one decade below the smallest positive step
            and labelled ``0``.
        title: figure title (default: the scores' names).

    >>> import pandas as pd
    >>> t = pd.DataFrame({"step": [0, 0, 10, 10], "layer": 0, "head": [0, 1, 0, 1],
    ...                   "mean": [0.1, 0.2, 0.9, 0.3]})
    >>> list(checkpoint_figure(t, top_k=1).data[0].y)  # the maximum over heads
    [0.2, 0.9]
    """
    missing = [c for c in ("step", "layer", "head", value) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the column(s) {missing}; it has {list(table.columns)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    data = table.dropna(subset=[value])
    if data.empty:
        raise ValueError(f"no {value!r} values to plot")
    if "score" not in data.columns:
        data = data.assign(score=value)
    dup = data.duplicated(["score", "step", "layer", "head"])
    if dup.any():
        row = data[dup].iloc[0]
        raise ValueError(f"several rows for score {row['score']!r}, step {row['step']}, head "
                         f"{row['layer']}.{row['head']}: one row per score, step and head")
    if (data["step"] < 0).any():
        raise ValueError("steps must be >= 0")
    label_of = (dict(zip(data["step"], data["label"].astype(str), strict=True))
                if "label" in data.columns else {})
    same_as = {}
    if "identical_to" in data.columns:
        flagged = data.dropna(subset=["identical_to"])
        same_as = dict(zip(flagged["step"], flagged["identical_to"].astype(str), strict=True))

    steps = sorted(data["step"].unique().tolist())
    positive = [s for s in steps if s > 0]
    zero_x = positive[0] / 10 if positive else 1.0

    def xs(values: Sequence[int | float]) -> list[int | float]:
        return [zero_x if log_x and v == 0 else v for v in values]

    scores = list(dict.fromkeys(data["score"]))
    fig = make_subplots(rows=len(scores), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=scores if len(scores) > 1 else None)
    color_of: dict[tuple[int, int], str] = {}  # one colour per head, the same in every subplot
    for row, score in enumerate(scores, start=1):
        part = data[data["score"] == score]
        wide = part.pivot(index="step", columns=["layer", "head"], values=value).sort_index()
        step_list = wide.index.tolist()
        labels = [label_of.get(s, str(s)) for s in step_list]
        best = wide.max(axis=1)
        best_head = [f"{layer}.{head}" for layer, head in wide.idxmax(axis=1)]
        group = {"legendgroup": score, "legendgrouptitle_text": score} if len(scores) > 1 else {}
        fig.add_trace(go.Scatter(
            x=xs(step_list), y=best.tolist(), mode="lines+markers", name="max over heads",
            line={"color": "black", "dash": "dash"}, marker={"size": 5},
            customdata=list(zip(step_list, labels, best_head, strict=True)),
            hovertemplate=(f"{score}: max over heads<br>step %{{customdata[0]}} "
                           f"(%{{customdata[1]}})<br>head %{{customdata[2]}}<br>{value} "
                           "%{y:.4f}<extra></extra>"), **group), row=row, col=1)
        last = part[part["step"] == part["step"].max()]
        top = last.sort_values([value, "layer", "head"], ascending=[False, True, True]).head(top_k)
        for layer, head in zip(top["layer"], top["head"], strict=True):
            color = color_of.setdefault(
                (layer, head), qualitative.Plotly[len(color_of) % len(qualitative.Plotly)])
            fig.add_trace(go.Scatter(
                x=xs(step_list), y=wide[(layer, head)].tolist(), mode="lines+markers",
                name=f"head {layer}.{head}", line={"color": color},
                marker={"size": 5}, customdata=list(zip(step_list, labels, strict=True)),
                hovertemplate=(f"{score}: head {layer}.{head}<br>step %{{customdata[0]}} "
                               f"(%{{customdata[1]}})<br>{value} %{{y:.4f}}<extra></extra>"),
                **group), row=row, col=1)
        marked = [s for s in step_list if s in same_as]
        if marked:
            fig.add_trace(go.Scatter(
                x=xs(marked), y=[best[s] for s in marked], mode="markers",
                name="identical weights", legendgroup="identical", showlegend=row == 1,
                marker={"symbol": "circle-open", "size": 14, "color": "red",
                        "line": {"width": 2}},
                customdata=[(s, label_of.get(s, str(s)), same_as[s]) for s in marked],
                hovertemplate=("step %{customdata[0]} (%{customdata[1]}): weights identical "
                               "to %{customdata[2]}<extra></extra>")), row=row, col=1)
        fig.update_yaxes(title_text=value, row=row, col=1)
    fig.update_xaxes(title_text="training step" + (" (log scale)" if log_x else ""),
                     row=len(scores), col=1)
    if log_x:
        fig.update_xaxes(type="log")
        if steps[0] == 0:  # label the stand-in position of step 0, and the decades
            decades = (range(math.ceil(math.log10(positive[0])),
                             math.floor(math.log10(positive[-1])) + 1) if positive else [])
            fig.update_xaxes(tickvals=[zero_x] + [10**d for d in decades],
                             ticktext=["0"] + [_si(10**d) for d in decades])
    if title is None:
        title = (f"{scores[0]} across training steps" if len(scores) == 1
                 else "scores across training steps")
    fig.update_layout(title=title, width=760, height=120 + 300 * len(scores),
                      margin={"l": 60, "r": 20, "t": 60, "b": 50})
    return fig


def save_figure(fig: go.Figure, path: str | os.PathLike[str],
                formats: Sequence[str] = ("png", "html"), *, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as ``path`` + ``.png`` / ``.svg`` / ``.pdf`` / ``.html``, each atomically.

    Static formats use kaleido (0.2.1 ships its own renderer: works offline). HTML files load
    ``plotly.min.js`` from their own folder (written there once), so they open offline.

    Returns:
        The written paths.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown figure formats {bad or list(formats)}; allowed: {list(FORMATS)}")
    base = Path(path)
    written = []
    for fmt in formats:
        target = base.with_name(base.name + f".{fmt}")
        with atomic_path(target) as tmp:
            if fmt == "html":
                # plotly.js (4.6 MB) goes once into the folder, shared by every HTML figure.
                fig.write_html(tmp, include_plotlyjs="directory", full_html=True)
                js = target.parent / "plotly.min.js"
                if not js.exists():
                    os.replace(tmp.parent / "plotly.min.js", js)
            else:
                fig.write_image(tmp, format=fmt, scale=scale)
        written.append(target)
    return written
