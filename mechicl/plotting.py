"""Plotting: layer x head heatmaps, per-layer bars, accuracy by shot count, pruning curves,
patching results, overlap matrices, score scatters, per-position loss curves and scores across
training checkpoints (plotly). Functions return ``go.Figure``; saving is explicit
(:func:`save_figure`).

Conventions shared by every heatmap: layer 0 at the BOTTOM, heads left to right, hover shows
layer, head and value; on every layer x head map (:func:`head_heatmap`, :func:`patch_heatmap`)
white lines separate the KV groups of grouped-query models (``kv_group_size``). Signed maps use
a diverging colour scale centred at zero; a scale other than linear is stated under the title
and in the colour bar. Accuracy and overlap figures can draw chance (``chance=`` /
``chance_x=`` / ``chance_y=``); intervals are named in the legend or title.

Axis names: ``layer head``.
"""

import functools
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from mechicl._checks import check_choice, check_positive
from mechicl._io import atomic_path
from mechicl.results import HeadScores, LayerScores

__all__ = ["ablation_figure", "accuracy_figure", "check_formats", "checkpoint_figure",
           "head_heatmap", "kv_group_size", "layer_bars", "loss_curve", "matrix_heatmap",
           "patch_heatmap", "prune_curve_figure", "save_figure", "score_scatter",
           "static_export_available"]


def kv_group_size(model: dict[str, Any]) -> int:
    """Query heads per KV head, from a result's model provenance (``model["shape"]``; 1 if it
    does not say), to mark the groups on layer x head figures.

    >>> kv_group_size({"shape": {"n_heads": 9, "n_kv_heads": 3}})
    3
    """
    shape = model.get("shape") or {}
    return int(shape.get("n_heads", 1)) // int(shape.get("n_kv_heads", 1) or 1)


_model_group_size = kv_group_size  # the helper, under a name that arguments cannot shadow

FORMATS = ("png", "svg", "pdf", "html")


HEATMAP_SCALES = ("linear", "per_layer", "log")
"""Colour scales of :func:`head_heatmap` (``scale=``)."""

LOG_FLOOR_RATIO = 1e-4
"""Default floor of ``scale="log"``: this fraction of the map's largest value."""


def _group_lines(fig: go.Figure, n_heads: int, group: int | None) -> None:
    """White vertical lines between the KV groups of a heads-on-x heatmap (``group`` query heads
    per KV head; nothing for ``group`` <= 1)."""
    if group and group > 1:
        for boundary in range(group, n_heads, group):
            fig.add_vline(x=boundary - 0.5, line={"color": "white", "width": 1})


def head_heatmap(
    scores: HeadScores | Float[Tensor, "layer head"],
    *,
    title: str | None = None,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str | None = None,
    kv_group_size: int | None = None,
    colorbar_title: str = "score",
    scale: str = "linear",
    signed: bool | None = None,
    log_floor: float | None = None,
) -> go.Figure:
    """A layer x head heatmap of per-head scores.

    Scales (``scale=``), stated under the title and in the colour bar's title, so that a caption
    can quote them (also in ``fig.layout.meta["scale_note"]``, empty for ``"linear"``):

    - ``"linear"``: the values.
    - ``"per_layer"``: each layer divided by its own largest absolute value (rows of zeros stay
      zero), so the structure of layers with small scores is visible; values lie in [0, 1]
      ([-1, 1] for signed maps), and the default colour range is exactly that. Compare heads
      within a layer, not across layers.
    - ``"log"``: ``log10(max(value, floor))``; ``floor`` is ``log_floor`` or, by default,
      :data:`LOG_FLOOR_RATIO` (1e-4) x the largest value, so zeros are drawn at the floor.
      Not for signed maps (a ``ValueError`` names the scales that are).

    Signed maps (``signed=True``, or by default any map with a negative value) use a diverging
    colour scale (``RdBu_r``: red above 0, blue below) centred at zero (``zmid=0``) with a
    symmetric range: ``+-max(|zmin|, |zmax|)`` when given, else ``+-`` the largest ``|value|``.

    Args:
        scores: a :class:`~mechicl.results.HeadScores` (its mean is plotted) or a
            ``[layer, head]`` tensor.
        title: figure title (default: the score's name).
        zmin: lower end of the colour range, in the units drawn (scaled / log10); pass the same
            zmin/zmax to a set of figures for a consistent scale.
        zmax: upper end of the colour range.
        colorscale: plotly colour scale name (default ``Viridis``; ``RdBu_r`` for signed maps).
        kv_group_size: query heads per KV head; draws group separators when > 1.
        colorbar_title: label of the colour bar.
        scale: ``"linear"``, ``"per_layer"`` or ``"log"`` (see above).
        signed: diverging colour scale centred at zero; ``None`` decides from the values.
        log_floor: smallest value drawn with ``scale="log"`` (> 0).

    Hover shows each head's raw value (and the drawn value when scaled).

    >>> fig = head_heatmap(torch.rand(3, 4), title="random")
    >>> fig.data[0].z.shape
    (3, 4)
    >>> fig = head_heatmap(torch.tensor([[1.0, 2.0], [0.0, 0.5]]), scale="per_layer")
    >>> fig.data[0].z.tolist(), fig.layout.meta["scale_note"]
    ([[0.5, 1.0], [0.0, 1.0]], 'per-layer scaled: each layer divided by its largest |value|')
    """
    check_choice("scale", scale, HEATMAP_SCALES)
    mean = scores.mean if isinstance(scores, HeadScores) else scores
    if mean.ndim != 2:
        raise ValueError(f"expected [layer, head] scores, got shape {tuple(mean.shape)}")
    if title is None:
        title = scores.name if isinstance(scores, HeadScores) else ""
    raw = mean.detach().to("cpu", torch.float64).numpy()
    n_layers, n_heads = raw.shape
    finite = raw[np.isfinite(raw)]
    negative = bool((finite < 0).any())
    signed = negative if signed is None else signed
    z, note, bar = raw, "", colorbar_title
    if scale == "per_layer":
        top = np.where(np.isfinite(raw), np.abs(raw), 0.0).max(axis=1, keepdims=True)
        z = raw / np.where(top > 0, top, 1.0)
        note = "per-layer scaled: each layer divided by its largest |value|"
        bar = f"{colorbar_title}<br>(per-layer scaled)"
        if not signed and zmin is None and zmax is None:
            zmin, zmax = 0.0, 1.0
        elif signed and zmin is None and zmax is None:
            zmin, zmax = -1.0, 1.0
    elif scale == "log":
        if signed or negative:
            low = f" (minimum {finite.min():.3g})" if negative else ""
            raise ValueError(f"scale='log' needs a non-negative map{low}; for signed maps use "
                             "scale='linear' or 'per_layer' (allowed scales: "
                             f"{list(HEATMAP_SCALES)}, 'log' for non-negative maps only)")
        if log_floor is None:
            largest = float(finite.max()) if finite.size else 0.0
            log_floor = LOG_FLOOR_RATIO * largest if largest > 0 else LOG_FLOOR_RATIO
        elif not log_floor > 0:
            raise ValueError(f"log_floor={log_floor!r} must be > 0")
        with np.errstate(invalid="ignore"):
            z = np.log10(np.maximum(raw, log_floor))  # NaN stays NaN
        note = f"log10 scale; values below {log_floor:.2g} drawn at {log_floor:.2g}"
        bar = f"log10 {colorbar_title}"
    zmid = None
    if signed:
        if zmin is None and zmax is None:
            drawn = z[np.isfinite(z)]
            bound = float(np.abs(drawn).max()) if drawn.size else 1.0
        else:
            bound = max(abs(v) for v in (zmin, zmax) if v is not None)
        bound = bound if bound > 0 else 1.0
        zmin, zmax, zmid = -bound, bound, 0.0
    if colorscale is None:
        colorscale = "RdBu_r" if signed else "Viridis"
    value = ("value %{customdata:.4g}<br>drawn %{z:.4f}" if scale != "linear"
             else "value %{z:.4f}")
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=zmin, zmax=zmax, zmid=zmid,
        colorscale=colorscale, colorbar={"title": {"text": bar}},
        customdata=raw if scale != "linear" else None,
        hovertemplate=f"layer %{{y}}<br>head %{{x}}<br>{value}<extra></extra>",
    ))
    _group_lines(fig, n_heads, kv_group_size)
    if note:
        title = f"{title}<br><sup>{note}</sup>" if title else note
    fig.update_layout(
        title=title, xaxis_title="head", yaxis_title="layer",
        width=max(360, 60 + 28 * n_heads + 120, _title_width(title)),
        height=max(320, 120 + 18 * n_layers),
        margin={"l": 60, "r": 20, "t": 70 if note else 50, "b": 50},
        meta={"scale": scale, "scale_note": note, "signed": signed},
    )
    fig.update_yaxes(autorange=True, dtick=max(1, n_layers // 15))  # layer 0 at the bottom
    fig.update_xaxes(dtick=1)
    return fig


def _title_width(title: str) -> int:
    """Figure width (px) that fits a title's widest line at plotly's default 17 px title font.

    About 9 px per character plus the 40 px left margin; ``<sup>`` lines are drawn smaller.
    """
    widths = []
    for line in title.split("<br>"):
        plain = re.sub(r"<[^>]+>", "", line)
        widths.append(len(plain) * (6 if "<sup>" in line else 9))
    return 40 + max(widths, default=0)


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


def accuracy_figure(table: pd.DataFrame, *, title: str = "accuracy by shot count",
                    ) -> go.Figure:
    """Accuracy against the number of shots, one line per task, with the ``ci_low``-``ci_high``
    interval (95% Wilson for :class:`~mechicl.analyses.evaluation.EvalResult`) as error bars and
    chance as a dashed line: one black line labelled "chance" when every task has the same
    chance level, else one dashed line per task in its colour. The x axis ends at the largest
    shot count.

    Args:
        table: columns ``task shots accuracy chance`` (``ci_low ci_high`` optional), one row per
            task and shot count, e.g. ``pd.DataFrame([r.summary() for r in results])``.
        title: figure title.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"task": "a", "shots": [0, 1], "accuracy": [0.3, 0.8], "chance": 0.25})
    >>> [(s.type, s.y0) for s in accuracy_figure(t).layout.shapes]
    [('line', 0.25)]
    """
    missing = [c for c in ("task", "shots", "accuracy", "chance") if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("no accuracies to plot")
    data = table.sort_values("shots", kind="stable")  # tasks in the table's order
    shots = sorted(data["shots"].unique().tolist())
    chances = data.groupby("task", sort=False)["chance"].first()
    shared = bool(np.allclose(chances.to_numpy(float), float(chances.iloc[0])))
    fig = go.Figure()
    for i, (task, rows) in enumerate(data.groupby("task", sort=False)):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        error = None
        if {"ci_low", "ci_high"} <= set(rows.columns):
            error = {"type": "data", "symmetric": False, "thickness": 1,
                     "array": (rows.ci_high - rows.accuracy).to_numpy(float),
                     "arrayminus": (rows.accuracy - rows.ci_low).to_numpy(float)}
        fig.add_trace(go.Scatter(
            x=rows.shots, y=rows.accuracy, mode="lines+markers", name=str(task),
            line={"color": color}, error_y=error, legendgroup=str(task),
            hovertemplate=f"{task}<br>%{{x}} shots<br>accuracy %{{y:.3f}}<extra></extra>"))
        if not shared:
            fig.add_trace(go.Scatter(
                x=[shots[0], shots[-1]], y=[float(chances[task])] * 2, mode="lines",
                line={"color": color, "dash": "dash", "width": 1}, legendgroup=str(task),
                name=f"{task}: chance", showlegend=False,
                hovertemplate=f"{task}: chance %{{y:.3f}}<extra></extra>"))
    if shared:
        fig.add_hline(y=float(chances.iloc[0]), line={"dash": "dash", "color": "black",
                                                       "width": 1},
                      annotation_text="chance", annotation_position="bottom right")
    note = "error bars: 95% interval; dashed: chance" + ("" if shared else " of each task")
    pad = 0.03 * ((shots[-1] - shots[0]) or 1)
    fig.update_layout(title=f"{title}<br><sup>{note}</sup>" if title else note,
                      xaxis_title="shots", yaxis_title="accuracy", yaxis_range=[-0.02, 1.02],
                      width=640, height=420, margin={"l": 60, "r": 20, "t": 70, "b": 50})
    fig.update_xaxes(tickvals=shots, range=[shots[0] - pad, shots[-1] + pad])
    return fig


def prune_curve_figure(curve: Any, *, x: str = "head_percent", title: str | None = None,
                       band: tuple[float, float] = (0.05, 0.95)) -> go.Figure:
    """Accuracy vs percentage pruned, one line per ranking with 95% paired-bootstrap error bars
    over prompts (when the curve has per-prompt correctness); random orders as their mean with
    the ``band`` quantiles of the draws' accuracies; the unpruned accuracy and chance as dashed
    lines. The x axis ends at the largest percentage evaluated.

    Args:
        curve: a :class:`~mechicl.analyses.pruning.PruneCurve`.
        x: ``"head_percent"`` or ``"ffn_percent"`` (the other percentage is held at 0).
        title: figure title.
        band: quantiles of the random draws drawn as the grey band.
    """
    if x not in ("head_percent", "ffn_percent"):
        raise ValueError(f"x={x!r} is not allowed; choose 'head_percent' or 'ffn_percent'")
    other = "ffn_percent" if x == "head_percent" else "head_percent"
    key = "head_ranking" if x == "head_percent" else "ffn_ranking"
    data = curve.data[curve.data[other] == 0]
    points = None
    if getattr(curve, "correct", None) is not None:
        points = curve.points(band=band)
        points = points[points[other] == 0]
    fig = go.Figure()
    for name, group in data.groupby(key, sort=True):
        if name == "none":
            continue
        stats = (group.groupby(x).accuracy
                 .agg(mean="mean", low=lambda a: a.quantile(band[0]),
                      high=lambda a: a.quantile(band[1])).reset_index())
        draws = group.draw.nunique()
        label = f"{name} ({draws} draws)" if name == "random" else str(name)
        if name == "random" and draws > 1:
            fig.add_trace(go.Scatter(
                x=list(stats[x]) + list(stats[x])[::-1],
                y=list(stats["high"]) + list(stats["low"])[::-1], fill="toself",
                # mode "lines": plotly marks the corners of traces under 20 points otherwise
                mode="lines", line={"width": 0}, fillcolor="rgba(128,128,128,0.25)",
                hoverinfo="skip",
                name=f"random: {band[0]:.0%}-{band[1]:.0%} of draws"))
        error = None
        if points is not None and name != "random":
            p = points[points[key] == name].set_index(x).loc[stats[x]]
            error = {"type": "data", "symmetric": False, "thickness": 1,
                     "array": (p.acc_high - p.accuracy).to_numpy(),
                     "arrayminus": (p.accuracy - p.acc_low).to_numpy()}
        fig.add_trace(go.Scatter(
            x=stats[x], y=stats["mean"], mode="lines+markers", name=label, error_y=error,
            line={"dash": "dot", "color": "gray"} if name == "random" else None,
            hovertemplate=f"{label}<br>%{{x}}% removed<br>accuracy %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=curve.baseline, line={"dash": "dash", "color": "black", "width": 1},
                  annotation_text="unpruned", annotation_position="top right")
    if "chance" in data and len(data):
        fig.add_hline(y=float(data.chance.iloc[0]), line={"dash": "dash", "color": "red", "width": 1},
                      annotation_text="chance", annotation_position="bottom right")
    unit = "heads" if x == "head_percent" else "FFNs"
    if title is None:
        p = curve.params
        title = f"{p.get('task', '')} {p.get('shots', '')}-shot: pruning {unit}"
    n = (f"<br><sup>n = {len(curve.correct[0])} prompts; error bars: 95% bootstrap</sup>"
         if points is not None else "")
    high = float(data[x].max()) if len(data) else 100.0
    fig.update_layout(title=title + n, xaxis_title=f"% of {unit} removed",
                      yaxis_title="accuracy", yaxis_range=[0, 1], width=640, height=480,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    fig.update_xaxes(range=[-1, high + 1])
    return fig


def ablation_figure(table: pd.DataFrame, *, title: str = "", y_title: str = "accuracy",
                    chance: float | None = None) -> go.Figure:
    """The causal check of an induction score, one group of markers per row of ``table``: the
    unablated value, the mean over ``k`` random heads ablated (error bars: the 5-95% band of the
    draws' means) and the top-``k`` heads ablated (error bars: its 95% interval, the unablated
    value plus the paired bootstrap interval of ``top - unablated``).

    Args:
        table: rows of :meth:`~mechicl.analyses.causal.InductionAblation.table`, with a
            ``subject`` column (e.g. the task) naming each row's group with ``k``.
        title: figure title.
        y_title: the measure (``"accuracy"`` or ``"later-copy loss"``).
        chance: a dashed chance line (accuracy).

    >>> import pandas as pd
    >>> t = pd.DataFrame({"subject": ["a"], "k": [5], "unablated": [0.8], "top": [0.5],
    ...                   "random_mean": [0.75], "random_low": [0.7], "random_high": [0.8],
    ...                   "top_vs_unablated_low": [-0.4], "top_vs_unablated_high": [-0.2]})
    >>> [tr.name for tr in ablation_figure(t).data]
    ['unablated', 'k random heads (5-95% of draws)', 'top-k heads (95% interval)']
    """
    needed = ["subject", "k", "unablated", "top", "random_mean", "random_low", "random_high",
              "top_vs_unablated_low", "top_vs_unablated_high"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks the column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("no rows to plot")
    labels = [f"{s}<br>k = {k}" for s, k in zip(table.subject, table.k, strict=True)]
    x = np.arange(len(labels), dtype=float)  # random draws left of each group, top-k right
    top_low = table.unablated + table.top_vs_unablated_low
    top_high = table.unablated + table.top_vs_unablated_high
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=table.unablated, mode="markers", name="unablated",
                             marker={"symbol": "line-ew-open", "size": 40, "color": "black"}))
    fig.add_trace(go.Scatter(
        x=x - 0.12, y=table.random_mean, mode="markers", name="k random heads (5-95% of draws)",
        marker={"color": "gray", "size": 9},
        error_y={"type": "data", "symmetric": False, "thickness": 1,
                 "array": (table.random_high - table.random_mean).to_numpy(float),
                 "arrayminus": (table.random_mean - table.random_low).to_numpy(float)}))
    fig.add_trace(go.Scatter(
        x=x + 0.12, y=table.top, mode="markers", name="top-k heads (95% interval)",
        marker={"color": "crimson", "size": 9, "symbol": "diamond"},
        error_y={"type": "data", "symmetric": False, "thickness": 1,
                 "array": (top_high - table.top).to_numpy(float),
                 "arrayminus": (table.top - top_low).to_numpy(float)}))
    if chance is not None:
        fig.add_hline(y=chance, line={"dash": "dash", "color": "red", "width": 1},
                      annotation_text="chance", annotation_position="top left")
    fig.update_xaxes(tickvals=x, ticktext=labels, range=[-0.5, len(labels) - 0.5])
    fig.update_layout(title=title, yaxis_title=y_title, width=max(480, 110 * len(x) + 160),
                      height=440, margin={"l": 60, "r": 20, "t": 50, "b": 80},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.22, "x": 0})
    return fig


def patch_heatmap(result: Any, *, sum_over: str | None = None,
                  title: str | None = None, effect: bool = True,
                  kv_group_size: int | None = None) -> go.Figure:
    """A heatmap of a patching result: layer x head, layer x position, or (1-D) layers.

    Colours are centred on "no effect" (the unpatched run's score), red where patching raises
    the metric and blue where it lowers it, on a range symmetric about it. On layer x (query)
    head maps, white lines separate the KV groups of grouped-query models, as on
    :func:`head_heatmap`.

    Args:
        result: a :class:`~mechicl.analyses.patching.PatchResult`.
        sum_over: for three-axis results (per head and position), the axis to sum effects over
            (``"pos"`` or ``"head"``).
        title: figure title (default: target, direction, metric).
        effect: plot ``values - baseline`` (default) instead of the values.
        kv_group_size: query heads per KV head, for the group separators of a map with heads
            on the x axis; default: from the result's model provenance
            (:func:`kv_group_size`); 1 draws none. ``kv_head`` axes (one column per group)
            get none.
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
    bound = bound if bound > 0 else 1.0
    base = 0.0 if effect else result.baseline
    fig = go.Figure(go.Heatmap(
        z=z, x=xlabels, y=ylabels, colorscale="RdBu_r", zmid=base,
        zmin=base - bound, zmax=base + bound,
        colorbar={"title": "effect" if effect else result.metric},
        hovertemplate=f"{axes[0]} %{{y}}<br>{xname} %{{x}}<br>%{{z:.4f}}<extra></extra>"))
    if xname == "head":
        group = _model_group_size(result.model) if kv_group_size is None else kv_group_size
        _group_lines(fig, len(xlabels), group)
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
                   colorbar_title: str = "", fmt: str = ".2f",
                   chance: float | None = None) -> go.Figure:
    """A square (or any) matrix of statistics, e.g. from :func:`mechicl.analyses.overlap.overlap_matrix`,
    with its values written in the cells; rows top to bottom in the DataFrame's order.

    ``chance`` (e.g. ``k / n`` for top-k overlap shares) marks the value expected by chance on
    the colour bar: a tick labelled ``chance <value>`` among four evenly spaced ones (those
    that would collide with it are dropped), so cells can be read against it.

    >>> import pandas as pd
    >>> fig = matrix_heatmap(pd.DataFrame([[1.0, 0.2], [0.2, 1.0]], index=["a", "b"],
    ...                                   columns=["a", "b"]))
    >>> fig.data[0].z.tolist()
    [[1.0, 0.2], [0.2, 1.0]]
    """
    z = matrix.to_numpy(dtype=float)
    rows, cols = [str(i) for i in matrix.index], [str(c) for c in matrix.columns]
    text = [[format(v, fmt) for v in row] for row in z.tolist()]
    colorbar: dict[str, Any] = {"title": colorbar_title}
    if chance is not None:
        finite = z[np.isfinite(z)]
        low = zmin if zmin is not None else float(min(finite.min(initial=chance), chance))
        high = zmax if zmax is not None else float(max(finite.max(initial=chance), chance))
        ticks = [float(t) for t in np.linspace(low, high, 5)
                 if abs(t - chance) > 0.08 * (high - low)]
        values = sorted([*ticks, float(chance)])
        colorbar |= {"tickvals": values, "ticktext": [
            f"chance {v:.2g}" if v == chance else f"{v:.2g}" for v in values]}
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, colorscale=colorscale, zmin=zmin, zmax=zmax, text=text,
        texttemplate="%{text}", colorbar=colorbar,
        hovertemplate="%{y} vs %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_autorange="reversed",
                      width=max(420, 60 * len(cols) + 220), height=max(360, 40 * len(rows) + 160),
                      margin={"l": 120, "r": 20, "t": 50, "b": 100})
    return fig


def score_scatter(x: HeadScores | Float[Tensor, "layer head"],
                  y: HeadScores | Float[Tensor, "layer head"], *, label_top: int = 5,
                  x_title: str | None = None, y_title: str | None = None,
                  title: str = "", chance_x: float | None = None,
                  chance_y: float | None = None) -> go.Figure:
    """One point per head: score ``x`` (e.g. prefix matching) against score ``y`` (e.g. task
    importance); hover shows ``layer.head``, and the ``label_top`` highest heads of either score
    are labelled (as annotations, ``fig.layout.annotations``; ``trace.text`` holds the same
    labels). A label sits next to its point, or further out joined to it by a thin line, where
    it does not collide with the other labels and points (estimated in pixels).

    Args:
        chance_x: a value of ``x`` expected by chance, drawn as a dashed vertical line
            labelled "chance" at its top.
        chance_y: the same for ``y``: a dashed horizontal line labelled "chance" at its
            right end (the two labels sit at different corners).
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
    width, height = 640, 480
    px, py = xs.flatten().numpy(), ys.flatten().numpy()
    fig = go.Figure(go.Scatter(
        x=px, y=py, mode="markers", text=labels, customdata=names,
        marker={"size": 6, "opacity": 0.7},
        hovertemplate="head %{customdata}<br>x %{x:.4f}<br>y %{y:.4f}<extra></extra>"))
    for i, (dx, dy) in _label_offsets(px, py, labels, width - 80, height - 100,
                                      chance_x=chance_x, chance_y=chance_y).items():
        fig.add_annotation(x=float(px[i]), y=float(py[i]), text=labels[i], ax=dx, ay=-dy,
                           showarrow=True, arrowhead=0, arrowwidth=0.8, arrowcolor="gray",
                           standoff=3, font={"size": 11})
    reference = {"dash": "dash", "color": "red", "width": 1}
    if chance_y is not None:
        fig.add_hline(y=chance_y, line=reference, annotation_text="chance",
                      annotation_position="bottom right")
    if chance_x is not None:
        fig.add_vline(x=chance_x, line=reference, annotation_text="chance",
                      annotation_position="top left")
    fig.update_layout(
        title=title,
        xaxis_title=x_title or (x.name.replace("_", " ") if isinstance(x, HeadScores) else "x"),
        yaxis_title=y_title or (y.name.replace("_", " ") if isinstance(y, HeadScores) else "y"),
        width=width, height=height, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


_LABEL_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (-1, -1), (1, -1))


def _label_offsets(x: np.ndarray, y: np.ndarray, labels: Sequence[str], width: int | float,
                   height: int | float, *, chance_x: float | None = None,
                   chance_y: float | None = None) -> dict[int, tuple[float, float]]:
    """Where to put each non-empty label: the pixel offset (right, up) of its centre from its
    point. Greedy, highest point first: the first spot, nearest first (next to the point above,
    below, right, left, then diagonally, then the same directions further out, joined to the
    point by a line), whose estimated text box (8 px per character, 15 px high; the data span
    ``0.9 x width`` by ``0.9 x height`` px) overlaps no label placed so far, no marker and
    nothing outside the plot area, nor the "chance" labels of :func:`score_scatter`'s lines at
    ``chance_x`` / ``chance_y``; if none does, the spot overlapping least (overlaps of labels
    counting 10-fold).

    >>> offsets = _label_offsets(np.array([0.5, 0.51, 0.0, 1.0]), np.array([0.5, 0.5, 0.0, 1.0]),
    ...                          ["0.1", "0.2", "", ""], 560, 380)
    >>> offsets  # two points 5 px apart: one label above, one below
    {0: (0.0, 12.5), 1: (0.0, -12.5)}
    """
    def px(v: np.ndarray, data: np.ndarray, size: float) -> np.ndarray:
        ok = data[np.isfinite(data)]
        span = float(ok.max() - ok.min()) if ok.size else 0.0
        return (v - (ok.min() if ok.size else 0.0)) / (span or 1.0) * 0.9 * size

    width, height = float(width), float(height)
    x, y = np.asarray(x, float), np.asarray(y, float)
    px_x, px_y = px(x, x, width), px(y, y, height)
    markers = [(a - 3, a + 3, b - 3, b + 3) for a, b in zip(px_x, px_y, strict=True)
               if np.isfinite(a) and np.isfinite(b)]
    placed: list[tuple[float, float, float, float]] = []  # labels, and the "chance" labels
    area = (-0.05 * width, 0.95 * width, -0.05 * height, 0.95 * height)
    if chance_y is not None:  # "chance" below the line's right end
        cy = float(px(np.array([chance_y]), y, height)[0])
        placed.append((area[1] - 55.0, area[1], cy - 17.0, cy))
    if chance_x is not None:  # "chance" left of the line's top end
        cx = float(px(np.array([chance_x]), x, width)[0])
        placed.append((cx - 55.0, cx, area[3] - 17.0, area[3]))

    def shared(box: tuple[float, ...], o: tuple[float, ...]) -> float:
        return (max(0.0, min(box[1], o[1]) - max(box[0], o[0]))
                * max(0.0, min(box[3], o[3]) - max(box[2], o[2])))

    def cost(box: tuple[float, ...]) -> float:
        outside = (box[1] - box[0]) * (box[3] - box[2]) - shared(box, area)
        return (outside + sum(shared(box, o) for o in markers)
                + 10 * sum(shared(box, o) for o in placed))

    out: dict[int, tuple[float, float]] = {}
    order = sorted((i for i, t in enumerate(labels) if t and np.isfinite(px_x[i] + px_y[i])),
                   key=lambda i: (-px_y[i], px_x[i]))
    for i in order:
        w, h, gap = 8.0 * len(labels[i]), 15.0, 5.0
        best = None
        for ring in range(4):
            for ux, uy in _LABEL_DIRECTIONS:
                dx = ux * (w / 2 + gap + 20.0 * ring)
                dy = uy * (h / 2 + gap + 15.0 * ring)
                cx, cy = px_x[i] + dx, px_y[i] + dy
                box = (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2)
                c = cost(box)
                if best is None or c < best[0]:
                    best = (c, (float(dx), float(dy)), box)
                if c == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None
        out[i] = best[1]
        placed.append(best[2])
    return out


Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: mean +- Z95 standard errors is a 95% interval."""


def _mean_band(values: Float[Tensor, "seq point"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per column, over the non-NaN rows: the mean, the 95% normal interval's ends (mean +-
    :data:`Z95` x the standard error, sample standard deviation with n - 1; NaN when n < 2) and
    n."""
    valid = ~torch.isnan(values)
    n = valid.sum(0)
    mean = torch.nanmean(values, dim=0)
    squares = torch.where(valid, (values - mean) ** 2, 0.0).sum(0)
    se = (squares / (n - 1).clamp(min=1)).sqrt() / n.clamp(min=1).sqrt()
    se = torch.where(n >= 2, se, float("nan"))
    return mean, mean - Z95 * se, mean + Z95 * se, n


def loss_curve(loss: HeadScores | Float[Tensor, "seed pos"],
               block_lengths: Int[Tensor, " seed"] | None = None, *, title: str = "",
               bins_per_copy: int | None = None) -> go.Figure:
    """Per-position next-token loss on repeated random sequences (induction: the loss drops
    after the first copy). ``loss[seed, i]`` predicts token ``i + 1``; NaN marks padding.

    Drawn: the mean over sequences and, as a band, its 95% confidence interval, mean +- 1.96
    standard errors over sequences (normal approximation; named in the legend, n on hover;
    no band where fewer than two sequences have data). The x axis ends at the last position
    with data.

    With one common copy length (or none given) the x-axis is the position predicted and
    dashed lines mark the copies. With varying lengths (the scan's default: L = 2s + 25) the
    x-axis is in copies: each sequence's position ``p`` is at ``p / L``, in bins of
    ``1 / bins_per_copy`` copies (default: the shortest copy length, so that every sequence has
    a position in every bin); each sequence's losses are averaged within a bin, then the band is
    over sequences.

    Args:
        loss: ``[seed, pos]`` losses, or a prefix-matching ``HeadScores`` from a scan (its
            ``extras["loss_per_position"]`` and ``extras["block_length"]``).
        block_lengths: ``[seed]`` length of one copy per seed.
        title: figure title.
        bins_per_copy: bins per copy with varying lengths.
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
    if bins_per_copy is not None:
        check_positive("bins_per_copy", bins_per_copy)
    n_seq, n_pos = loss.shape
    predicted = torch.arange(1, n_pos + 1)  # the position each loss predicts
    blocks = None if block_lengths is None else block_lengths.detach().cpu().long()
    if blocks is not None and blocks.shape != (n_seq,):
        raise ValueError(f"block_lengths must be [seed] = [{n_seq}], got {tuple(blocks.shape)}")
    common = blocks is None or bool((blocks == blocks[0]).all())
    if common:
        values, x = loss, predicted.double()
        x_title, unit, fmt = "position", "position", "%{x}"
    else:
        assert blocks is not None
        nb = bins_per_copy or int(blocks.min())
        # bin b holds p / L in (b / nb, (b + 1) / nb]
        bins = (predicted[None] * nb + blocks[:, None] - 1) // blocks[:, None] - 1
        valid = ~torch.isnan(loss)
        n_bins = int(bins[valid].max()) + 1 if bool(valid.any()) else 1
        index = torch.where(valid, bins, n_bins)  # padding goes to a discarded extra bin
        sums = torch.zeros(n_seq, n_bins + 1, dtype=torch.float64).scatter_add_(
            1, index, torch.where(valid, loss, 0.0))
        counts = torch.zeros(n_seq, n_bins + 1, dtype=torch.float64).scatter_add_(
            1, index, valid.double())
        values = (sums / counts)[:, :n_bins]  # 0/0: NaN, a bin without data
        x = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / nb
        x_title = f"position / copy length (copies; bins of 1/{nb} copy)"
        unit, fmt = "copies", "%{x:.3f}"
    mean, low, high, n = _mean_band(values)
    has = torch.nonzero(n > 0).flatten()
    last = int(has.max()) + 1 if has.numel() else 0
    mean, low, high, n, x = mean[:last], low[:last], high[:last], n[:last], x[:last]
    x_end = (float(x[-1]) if common else last / nb) if last else 1.0

    band = "95% CI: mean ± 1.96 SE over sequences"
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=x.numpy(), y=mean.numpy(), mode="lines", name=f"mean over {n_seq} sequences",
        line={"color": "rgb(31,119,180)"},
        customdata=torch.stack([n.double(), low, high], dim=1).numpy(),
        hovertemplate=(f"{unit} {fmt}<br>loss %{{y:.3f}}<br>95% CI %{{customdata[1]:.3f}} to "
                       "%{customdata[2]:.3f}<br>n = %{customdata[0]} sequences<extra></extra>")))
    fig.add_trace(go.Scatter(x=x.numpy(), y=low.numpy(), mode="lines", line={"width": 0},
                             showlegend=False, hoverinfo="skip", name=f"{band} (low)"))
    fig.add_trace(go.Scatter(x=x.numpy(), y=high.numpy(), mode="lines", line={"width": 0},
                             fill="tonexty", fillcolor="rgba(31,119,180,0.25)",
                             hoverinfo="skip", name=band))
    copy = 1 if not common else (int(blocks[0]) if blocks is not None else 0)  # x per copy
    if copy:
        for c in range(1, int(x_end // copy) + 1):
            fig.add_vline(x=c * copy, line={"dash": "dash", "color": "gray", "width": 1})
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="next-token loss (nats)",
                      width=640, height=400, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"x": 0.99, "y": 0.99, "xanchor": "right", "yanchor": "top",
                              "bgcolor": "rgba(255,255,255,0.7)"})
    fig.update_xaxes(range=[0, x_end])
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


STATIC_FORMATS = ("png", "svg", "pdf")
"""The formats of :data:`FORMATS` that need the static exporter (kaleido 0.2.1, the ``static``
extra); ``html`` needs nothing beyond plotly."""

STATIC_EXPORT_HINT = "pip install 'mechicl[static]'"
"""What to install for :data:`STATIC_FORMATS` (kaleido 0.2.1, a headless Chromium of its own)."""


def static_export_available() -> bool:
    """Whether :data:`STATIC_FORMATS` can be written here: kaleido 0.2.1 (the ``static`` extra)
    is installed. kaleido >= 1 does not count: it drives a separately installed Chrome.

    >>> isinstance(static_export_available(), bool)
    True
    """
    try:
        from kaleido.scopes.plotly import PlotlyScope  # noqa: F401
    except ImportError:
        return False
    return True


def check_formats(formats: Sequence[str]) -> list[str]:
    """Validate figure formats before anything is computed or written: each must be one of
    :data:`FORMATS`, and the static ones need kaleido 0.2.1 (the ``static`` extra).

    Args:
        formats: format names, e.g. ``["png", "html"]``.

    Returns:
        The formats, as a list.

    Raises:
        ValueError: one line naming the unknown formats and the allowed ones, or the static
            formats asked for without kaleido and what to install.

    >>> check_formats(["html"])
    ['html']
    >>> check_formats(["gif"])
    Traceback (most recent call last):
    ...
    ValueError: unknown figure formats ['gif']; allowed: ['png', 'svg', 'pdf', 'html']
    """
    formats = list(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown figure formats {bad or formats}; allowed: {list(FORMATS)}")
    static = [f for f in formats if f in STATIC_FORMATS]
    if static and not static_export_available():
        raise ValueError(f"figure formats {static} need kaleido 0.2.1, which is not installed: "
                         f"{STATIC_EXPORT_HINT} (or ask for html only)")
    return formats


@functools.cache
def _kaleido_scope() -> Any:
    """kaleido 0.2.1's renderer (one headless Chromium per process, started on first use).

    It is called directly rather than through ``fig.write_image``: plotly >= 6.1 exports only
    through kaleido >= 1 (which needs a separately installed Chrome), while kaleido 0.2.1 ships
    its own Chromium and renders the plotly.js that plotly bundles (4.x with plotly 7) offline.
    """
    from kaleido.scopes.plotly import PlotlyScope

    # Without an explicit plotly.js, kaleido fetches one from a CDN: bundled copy, offline.
    plotlyjs = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return PlotlyScope(plotlyjs=str(plotlyjs))


def save_figure(fig: go.Figure, path: str | os.PathLike[str],
                formats: Sequence[str] = ("png", "html"), *, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as ``path`` + ``.png`` / ``.svg`` / ``.pdf`` / ``.html``, each atomically.

    Static formats use kaleido 0.2.1 (the ``static`` extra; it ships its own renderer and works
    offline); without it they raise before anything is written (:func:`check_formats`). HTML
    files load ``plotly.min.js`` from their own folder (written there once), so they open
    offline.

    Args:
        fig: the figure.
        path: the files' path without the extension.
        formats: any of :data:`FORMATS`.
        scale: pixel scale of the PNG (2.0: twice the figure's layout size).

    Returns:
        The written paths.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> [p.name for p in save_figure(go.Figure(), out / "empty", ["html"])]
    ['empty.html']
    """
    formats = check_formats(formats)
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
                data = _kaleido_scope().transform(fig.to_plotly_json(), format=fmt, scale=scale)
                Path(tmp).write_bytes(data)
        written.append(target)
    return written
