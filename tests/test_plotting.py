"""Figures built from known inputs: the expected traces, labels and values."""

import pytest
import torch

from mechicl.analyses.overlap import overlap_matrix
from mechicl.plotting import matrix_heatmap, patch_heatmap, score_scatter
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


def test_loss_curve_common_and_varying_lengths():
    from mechicl.plotting import loss_curve

    loss = torch.tensor([[5.0, 4.0, 1.0, 0.5], [3.0, 2.0, 1.0, float("nan")]])
    fig = loss_curve(loss, torch.tensor([2, 2]))
    (trace,) = fig.data
    assert trace.x.tolist() == [1, 2, 3, 4]
    assert trace.y.tolist() == pytest.approx([4.0, 3.0, 1.0, 0.5])  # nan-mean over sequences
    assert [s.x0 for s in fig.layout.shapes] == [2, 4]
    varying = loss_curve(loss, torch.tensor([2, 3]))
    assert len(varying.data) == 2
    assert varying.data[1].x.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 4 / 3])
    scores = HeadScores.from_per_seed("prefix_matching", torch.zeros(2, 1, 1, 1).squeeze(1),
                                      extras={"loss_per_position": loss,
                                              "block_length": torch.tensor([2, 2])})
    assert loss_curve(scores).data[0].y.tolist() == pytest.approx(trace.y.tolist())
    with pytest.raises(ValueError, match="no per-position loss"):
        loss_curve(HeadScores.from_per_seed("copying", torch.zeros(1, 1, 1)))
