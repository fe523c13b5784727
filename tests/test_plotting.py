"""Figures built from known inputs: the expected traces, labels and values."""

import statistics

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mechicl.analyses.overlap import overlap_matrix
from mechicl.plotting import (
    accuracy_figure,
    head_heatmap,
    loss_curve,
    matrix_heatmap,
    patch_heatmap,
    score_scatter,
)
from mechicl.results import HeadScores


def test_matrix_heatmap_shows_the_matrix():
    a = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    maps = {"a": a, "b": -a, "c": a + torch.tensor([[0.0, 5.0], [0.0, 0.0]])}
    m = overlap_matrix(maps)
    fig = matrix_heatmap(m, title="rank correlation")
    (trace,) = fig.data
    assert list(trace.x) == list(trace.y) == ["a", "b", "c"]
    assert trace.z.tolist() == m.to_numpy().tolist()
    assert trace.text[0][1] == "-1.00" and trace.text[0][0] == "1.00"
    assert fig.layout.title.text == "rank correlation"
    assert (trace.zmin, trace.zmax) == (-1.0, 1.0)


def test_score_scatter_points_and_labels():
    x = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.0, 0.8]])
    y = torch.tensor([[0.5, 0.1, 0.0], [0.7, 0.2, 0.3]])
    fig = score_scatter(HeadScores.from_per_seed("prefix_matching", x[None]), y, label_top=1,
                        y_title="importance")
    (trace,) = fig.data
    assert trace.x.tolist() == pytest.approx(x.flatten().tolist())
    assert trace.y.tolist() == pytest.approx(y.flatten().tolist())
    assert list(trace.customdata) == ["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"]
    # the top head of x (0.1) and of y (1.0) are labelled, no others
    assert list(trace.text) == ["", "0.1", "", "1.0", "", ""]
    assert fig.layout.xaxis.title.text == "prefix matching"
    assert fig.layout.yaxis.title.text == "importance"
    with pytest.raises((ValueError, TypeError)):  # jaxtyping checks the shapes first
        score_scatter(x, y[:1])


def test_patch_heatmap_layouts():
    from mechicl.analyses.patching import PatchResult

    values = torch.tensor([[0.0, 0.5], [1.0, float("nan")]])
    res = PatchResult(target="head_out", axes=("layer", "head"), values=values, per_pair=None,
                      clean=torch.tensor(2.0), corrupted=torch.tensor(0.0), metric="logit_diff",
                      normalized=True, direction="denoising")
    fig = patch_heatmap(res)
    (trace,) = fig.data
    z = torch.tensor(trace.z, dtype=torch.float64)
    assert torch.equal(torch.isnan(z), torch.isnan(values))
    assert trace.zmid == 0.0 and list(trace.y) == ["0", "1"] and list(trace.x) == ["0", "1"]
    by_pos = PatchResult(target="head_out", axes=("layer", "pos", "head"),
                         values=torch.arange(12.0).reshape(2, 3, 2), per_pair=None,
                         clean=torch.tensor(1.0), corrupted=torch.tensor(0.0), metric="logit_diff",
                         normalized=False, direction="denoising", labels={"pos": ["<s>", "a", "b"]})
    summed = patch_heatmap(by_pos, sum_over="head", effect=False).data[0]
    assert list(summed.x) == ["0: '<s>'", "1: 'a'", "2: 'b'"]
    assert summed.z.tolist() == by_pos.values.sum(-1).tolist()
    with pytest.raises(ValueError, match="sum_over"):
        patch_heatmap(by_pos)
    layers = PatchResult(target="resid_pre", axes=("layer",), values=torch.tensor([0.2, 0.4]),
                         per_pair=None, clean=torch.tensor(1.0), corrupted=torch.tensor(0.0),
                         metric="logit_diff", normalized=True, direction="denoising")
    col = patch_heatmap(layers).data[0]
    assert [r[0] for r in col.z.tolist()] == pytest.approx([0.2, 0.4]) and list(col.x) == ["resid_pre"]


def _band(columns):
    """Hand computation: mean and mean +- z(0.975) * stdev / sqrt(n) of each list of values."""
    z = statistics.NormalDist().inv_cdf(0.975)
    out = []
    for vals in columns:
        m = statistics.fmean(vals)
        half = z * statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else float("nan")
        out.append((m, m - half, m + half))
    return out


def _same(actual, expected):
    return np.allclose(np.asarray(actual, float), np.asarray(expected, float), equal_nan=True)


def test_loss_curve_common_length_mean_band_and_range():
    nan = float("nan")
    # the last column holds no data: the x axis must end at position 4, not 5
    loss = torch.tensor([[5.0, 4.0, 1.0, 0.5, nan], [3.0, 2.0, 1.0, nan, nan]])
    fig = loss_curve(loss, torch.tensor([2, 2]))
    mean, low, high = fig.data
    assert mean.x.tolist() == [1, 2, 3, 4]
    expected = _band([[5.0, 3.0], [4.0, 2.0], [1.0, 1.0], [0.5]])
    assert _same(mean.y, [e[0] for e in expected])  # nan-mean over sequences
    assert _same(low.y, [e[1] for e in expected]) and _same(high.y, [e[2] for e in expected])
    assert high.fill == "tonexty" and "1.96 SE over sequences" in high.name
    assert [s.x0 for s in fig.layout.shapes] == [2, 4]  # copies, none past the data
    assert tuple(fig.layout.xaxis.range) == (0, 4)
    scores = HeadScores.from_per_seed("prefix_matching", torch.zeros(2, 1, 1, 1).squeeze(1),
                                      extras={"loss_per_position": loss,
                                              "block_length": torch.tensor([2, 2])})
    assert _same(loss_curve(scores).data[0].y, mean.y)
    with pytest.raises(ValueError, match="no per-position loss"):
        loss_curve(HeadScores.from_per_seed("copying", torch.zeros(1, 1, 1)))


def test_loss_curve_varying_lengths_bins_in_copies():
    nan = float("nan")
    a = [5.0, 4.0, 1.0, 0.5]  # L = 2: positions 1..4 = 0.5, 1, 1.5, 2 copies
    b = [6.0, 3.0, 5.0, 2.0, 1.0, 0.0]  # L = 3: 1/3, 2/3, 1, 4/3, 5/3, 2 copies
    loss = torch.tensor([a + [nan, nan], b])
    fig = loss_curve(loss, torch.tensor([2, 3]))  # bins of 1/2 copy: (0, .5], (.5, 1], ...
    mean, low, high = fig.data
    assert mean.x.tolist() == pytest.approx([0.25, 0.75, 1.25, 1.75])
    expected = _band([[a[0], b[0]], [a[1], (b[1] + b[2]) / 2], [a[2], b[3]],
                      [a[3], (b[4] + b[5]) / 2]])
    assert _same(mean.y, [e[0] for e in expected])
    assert _same(low.y, [e[1] for e in expected]) and _same(high.y, [e[2] for e in expected])
    assert tuple(fig.layout.xaxis.range) == (0, 2.0)
    assert [s.x0 for s in fig.layout.shapes] == [1, 2]
    finer = loss_curve(loss, torch.tensor([2, 3]), bins_per_copy=1)
    assert finer.data[0].x.tolist() == pytest.approx([0.5, 1.5])


def test_head_heatmap_per_layer_scale():
    raw = torch.tensor([[1.0, 4.0, 2.0], [0.0, 0.0, 0.0], [0.01, 0.03, 0.02]])
    fig = head_heatmap(raw, title="importance", scale="per_layer")
    (trace,) = fig.data
    expected = [[0.25, 1.0, 0.5], [0.0, 0.0, 0.0], [1 / 3, 1.0, 2 / 3]]  # by hand
    assert _same(trace.z, expected)
    assert _same(trace.customdata, raw.tolist())  # hover shows the raw values
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert "per-layer scaled" in fig.layout.title.text
    assert "per-layer scaled" in trace.colorbar.title.text
    assert fig.layout.meta["scale"] == "per_layer"
    signed = head_heatmap(torch.tensor([[-2.0, 1.0], [0.5, 0.25]]), scale="per_layer").data[0]
    assert _same(signed.z, [[-1.0, 0.5], [1.0, 0.5]])
    assert (signed.zmin, signed.zmid, signed.zmax) == (-1.0, 0.0, 1.0)
    assert head_heatmap(raw).layout.meta["scale_note"] == ""  # linear: unchanged
    assert _same(head_heatmap(raw).data[0].z, raw.tolist())


def test_head_heatmap_log_scale():
    raw = torch.tensor([[1.0, 0.1], [0.0, 100.0]])
    fig = head_heatmap(raw, scale="log")  # default floor: 1e-4 * 100 = 0.01
    assert _same(fig.data[0].z, [[0.0, -1.0], [-2.0, 2.0]])
    assert "log10" in fig.data[0].colorbar.title.text and "log10" in fig.layout.title.text
    assert "0.01" in fig.layout.meta["scale_note"]
    floored = head_heatmap(raw, scale="log", log_floor=1e-3).data[0]
    assert _same(floored.z, [[0.0, -1.0], [-3.0, 2.0]])
    with pytest.raises(ValueError, match="scale='log' needs a non-negative.*per_layer"):
        head_heatmap(torch.tensor([[1.0, -0.5]]), scale="log")
    with pytest.raises(ValueError, match="scale='sqrt' is not allowed.*'per_layer', 'log'"):
        head_heatmap(raw, scale="sqrt")
    with pytest.raises(ValueError, match="log_floor"):
        head_heatmap(raw, scale="log", log_floor=0.0)


def test_head_heatmap_signed_maps_diverge_at_zero():
    signed = head_heatmap(torch.tensor([[-0.5, 2.0], [1.0, 0.0]])).data[0]
    assert (signed.zmin, signed.zmid, signed.zmax) == (-2.0, 0.0, 2.0)
    assert signed.colorscale == go.Heatmap(colorscale="RdBu_r").colorscale
    given = head_heatmap(torch.tensor([[-0.5, 2.0]]), zmin=-1.0, zmax=3.0).data[0]
    assert (given.zmin, given.zmid, given.zmax) == (-3.0, 0.0, 3.0)  # symmetric
    forced = head_heatmap(torch.tensor([[0.5, 2.0]]), signed=True).data[0]
    assert (forced.zmin, forced.zmid, forced.zmax) == (-2.0, 0.0, 2.0)
    plain = head_heatmap(torch.tensor([[0.5, 2.0]])).data[0]
    assert plain.zmid is None and plain.colorscale == go.Heatmap(colorscale="Viridis").colorscale
    off = head_heatmap(torch.tensor([[-0.5, 2.0]]), signed=False).data[0]
    assert off.zmid is None and off.zmin is None


def _vlines(fig):
    return sorted(s.x0 for s in fig.layout.shapes if s.type == "line" and s.x0 == s.x1)


def test_gqa_groups_marked_on_head_and_patch_heatmaps():
    from mechicl.analyses.patching import PatchResult

    assert _vlines(head_heatmap(torch.rand(2, 6), kv_group_size=2)) == [1.5, 3.5]
    gqa = {"shape": {"n_layers": 2, "n_heads": 6, "n_kv_heads": 3}}  # 2 query heads per group
    common = {"per_pair": None, "clean": torch.tensor(1.0), "corrupted": torch.tensor(0.0),
              "metric": "logit_diff", "normalized": True, "direction": "denoising", "model": gqa}
    heads = PatchResult(target="head_out", axes=("layer", "head"), values=torch.rand(2, 6),
                        **common)
    fig = patch_heatmap(heads)
    assert _vlines(fig) == [1.5, 3.5]
    assert all(s.line.color == "white" for s in fig.layout.shapes)
    assert _vlines(patch_heatmap(heads, kv_group_size=3)) == [2.5]
    assert _vlines(patch_heatmap(heads, kv_group_size=1)) == []
    by_pos = PatchResult(target="head_out", axes=("layer", "pos", "head"),
                         values=torch.rand(2, 4, 6), **common)
    assert _vlines(patch_heatmap(by_pos, sum_over="pos")) == [1.5, 3.5]  # layer x head
    assert _vlines(patch_heatmap(by_pos, sum_over="head")) == []  # layer x pos
    kv = PatchResult(target="v", axes=("layer", "kv_head"), values=torch.rand(2, 3), **common)
    assert _vlines(patch_heatmap(kv)) == []  # one column per group


def test_chance_lines_on_scatter_matrix_and_accuracy():
    import pandas as pd

    x = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.0, 0.8]])
    fig = score_scatter(x, x.flip(0), chance_y=0.25, chance_x=0.5)
    (h,) = [s for s in fig.layout.shapes if s.y0 == s.y1]
    (v,) = [s for s in fig.layout.shapes if s.x0 == s.x1]
    assert h.y0 == 0.25 and h.line.dash == "dash" and v.x0 == 0.5
    notes = [a for a in fig.layout.annotations if a.text == "chance"]
    assert len(notes) == 2
    assert len({(a.x, a.y, a.xanchor, a.yanchor) for a in notes}) == 2  # not on each other
    assert not score_scatter(x, x).layout.shapes

    m = pd.DataFrame([[0.5, 0.1], [0.02, 1.0]], index=["a", "b"], columns=["c", "d"])
    bar = matrix_heatmap(m, zmin=0.0, zmax=1.0, chance=0.05).data[0].colorbar
    assert 0.05 in bar.tickvals and "chance 0.05" in bar.ticktext
    assert all(abs(t - 0.05) > 0.08 for t in bar.tickvals if t != 0.05)  # no colliding tick
    assert matrix_heatmap(m).data[0].colorbar.tickvals is None

    table = pd.DataFrame({"task": ["a", "a", "b", "b"], "shots": [0, 5, 0, 5],
                          "accuracy": [0.3, 0.8, 0.5, 0.6], "ci_low": [0.2, 0.7, 0.4, 0.5],
                          "ci_high": [0.4, 0.9, 0.6, 0.7], "chance": [0.25, 0.25, 0.25, 0.25]})
    acc = accuracy_figure(table)
    assert [(s.y0, s.y1) for s in acc.layout.shapes] == [(0.25, 0.25)]
    assert acc.layout.annotations[0].text == "chance"
    assert acc.data[0].error_y.array.tolist() == pytest.approx([0.1, 0.1])
    assert acc.layout.xaxis.range[1] < 5.5  # ends with the data
    mixed = accuracy_figure(table.assign(chance=[0.25, 0.25, 0.5, 0.5]))
    lines = {t.name: list(t.y) for t in mixed.data if t.line.dash == "dash"}
    assert lines == {"a: chance": [0.25, 0.25], "b: chance": [0.5, 0.5]}
    with pytest.raises(ValueError, match="chance"):
        accuracy_figure(table.drop(columns="chance"))


def _label_boxes(fig):
    """Each label annotation's text box in pixels of the 560 x 380 px plot area (8 px per
    character, 15 px high), from the axis ranges plotly would draw (the data +- 5%)."""
    (trace,) = [t for t in fig.data if t.mode == "markers"]
    xs, ys = np.asarray(trace.x, float), np.asarray(trace.y, float)
    sx, sy = 560 / (1.1 * np.ptp(xs)), 380 / (1.1 * np.ptp(ys))
    boxes = []
    for a in fig.layout.annotations:
        if a.text == "chance":
            continue
        cx, cy = a.x * sx + a.ax, a.y * sy - a.ay
        w = 8 * len(a.text)
        boxes.append((cx - w / 2, cx + w / 2, cy - 7.5, cy + 7.5))
    return boxes


def test_score_scatter_labels_do_not_collide():
    # a cluster of eight top heads within a few pixels, as in real maps
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 9, generator=g)
    y = x + 0.1 * torch.rand(30, 9, generator=g)
    fig = score_scatter(x, y, label_top=5)
    trace = fig.data[0]
    labelled = [t for t in trace.text if t]
    assert sorted(a.text for a in fig.layout.annotations) == sorted(labelled)
    boxes = _label_boxes(fig)
    assert len(boxes) == len(labelled) >= 6
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap_x = min(a[1], b[1]) - max(a[0], b[0])
            overlap_y = min(a[3], b[3]) - max(a[2], b[2])
            assert overlap_x <= 0 or overlap_y <= 0, (a, b)


def test_head_heatmap_is_wide_enough_for_its_title():
    # Gemma-3's 4-head maps cut "country_capital 1-shot: attribution-mean" at 360 px
    narrow = torch.rand(18, 4)
    assert head_heatmap(narrow, title="short").layout.width == 360
    long_title = "country_capital 1-shot: attribution-mean"
    assert head_heatmap(narrow, title=long_title).layout.width >= 40 + 9 * len(long_title)
    # a <sup> note is drawn smaller and the markup itself takes no width
    note = "<sup>" + "x" * 40 + "</sup>"
    assert head_heatmap(narrow, title=f"short<br>{note}").layout.width == 360
