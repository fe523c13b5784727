"""Static figure export (kaleido 0.2.1's renderer, called directly so plotly is not capped) and
the one-line error when the exporter is missing."""

import struct
import sys

import plotly.graph_objects as go
import pytest
import torch

from mechicl.plotting import (
    FORMATS,
    STATIC_FORMATS,
    check_formats,
    head_heatmap,
    save_figure,
    static_export_available,
)
from mechicl.results import HeadScores


def _heatmap() -> go.Figure:
    per_seed = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    scores = HeadScores.from_per_seed("prefix_matching", per_seed)
    fig = head_heatmap(scores, kv_group_size=2)
    fig.update_layout(width=300, height=200)
    return fig


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def test_static_formats_are_real_files_at_the_figure_size(tmp_path):
    # The test extra installs kaleido: no skip, a missing exporter fails here.
    written = save_figure(_heatmap(), tmp_path / "fig", ["png", "svg", "pdf"], scale=2.0)
    assert [p.name for p in written] == ["fig.png", "fig.svg", "fig.pdf"]
    assert _png_size((tmp_path / "fig.png").read_bytes()) == (600, 400)  # layout x scale
    svg = (tmp_path / "fig.svg").read_text()
    assert svg.startswith("<svg") and 'width="300"' in svg
    assert "prefix" in svg.lower()  # the title is rendered text, not an empty page
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    # Nothing but the figures (the atomic writes leave no temporary files behind).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png", "fig.svg"]
    # A second figure reuses the renderer; scale changes the pixel size only.
    save_figure(_heatmap(), tmp_path / "small", ["png"], scale=1.0)
    assert _png_size((tmp_path / "small.png").read_bytes()) == (300, 200)


@pytest.fixture
def no_kaleido(monkeypatch):
    """kaleido absent: importing its renderer raises ImportError (as when it is not installed)."""
    monkeypatch.setitem(sys.modules, "kaleido.scopes.plotly", None)


def test_missing_exporter_is_one_line_naming_what_to_install(no_kaleido, tmp_path):
    assert not static_export_available()
    with pytest.raises(ValueError, match=r"^figure formats \['png', 'pdf'\] need kaleido 0\.2\.1, "
                                         r"which is not installed: pip install "
                                         r"'mechicl\[static\]' \(or ask for html only\)$"):
        save_figure(_heatmap(), tmp_path / "fig", ["html", "png", "pdf"])
    # Checked before anything is written: not even the HTML that came first.
    assert list(tmp_path.iterdir()) == []
    # HTML alone needs nothing but plotly.
    assert [p.name for p in save_figure(_heatmap(), tmp_path / "fig", ["html"])] == ["fig.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "plotly.min.js"]


def test_check_formats_names_the_bad_ones():
    assert check_formats(("html",)) == ["html"]
    with pytest.raises(ValueError, match=r"unknown figure formats \['jpg'\]; allowed: "
                                         r"\['png', 'svg', 'pdf', 'html'\]"):
        check_formats(["png", "jpg"])
    with pytest.raises(ValueError, match=r"unknown figure formats \[\]"):
        check_formats([])
    assert set(STATIC_FORMATS) == set(FORMATS) - {"html"}
