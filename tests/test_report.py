"""The HTML report (slimgraph/report.py): one self-contained file, a drawing per changed pass with
the changed nodes marked. Opening it in a real browser is left to a later test (issue 14)."""

from __future__ import annotations

import re

import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.report import change_marks

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet18_result():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    return slimgraph.optimize(model, "fold-bn,prune{ratio=0.5},quantize,fold-int8", example_inputs=x,
                              calibration_data=calibration)


def _section(text: str, index: int) -> str:
    start = text.index(f'id="pass-{index}"')
    end = text.find('<section class="pass"', start)
    return text[start:end if end > 0 else len(text)]


def test_every_changed_pass_is_drawn_with_its_changes_marked(resnet18_result, tmp_path):
    path = resnet18_result.report(tmp_path / "report.html")
    text = path.read_text()
    graphs = resnet18_result.snapshots.graphs()
    for i, record in enumerate(resnet18_result.trace, 1):
        assert record.changed
        section = _section(text, i)
        assert 'class="sides drawing"' in section
        before, after = change_marks(graphs[i - 1], graphs[i])
        assert before or after, record.name
        drawn = set(re.findall(r'class="node (removed|added|changed)" data-name="([^"]+)"', section))
        want = {(m, n) for n, m in before.items()} | {(m, n) for n, m in after.items()}
        assert drawn == want, record.name  # every changed node drawn, marked as what happened to it
    removed = {n for n, m in change_marks(graphs[0], graphs[1])[0].items() if m == "removed"}
    assert any(n.startswith("bn") or "bn" in n for n in removed)  # fold-bn removed the BatchNorms


def test_the_report_is_self_contained_and_small(resnet18_result, tmp_path):
    text = resnet18_result.report(tmp_path / "report.html").read_text()
    urls = set(re.findall(r"(?:https?:)?//[\w./-]+", text)) - {"http://www.w3.org/2000/svg"}
    assert not urls and "<script src" not in text and "<link" not in text
    assert len(text) < 3_000_000


def test_the_report_never_overwrites(resnet18_result, tmp_path):
    path = tmp_path / "report.html"
    path.write_text("mine")
    with pytest.raises(SlimgraphError, match="already exists"):
        resnet18_result.report(path)
    assert path.read_text() == "mine"
