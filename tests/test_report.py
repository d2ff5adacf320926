"""The HTML report (slimgraph/report.py): one self-contained file, a drawing per changed pass with
the changed nodes marked, laid out so chains stay straight. tests/test_report_browser.py opens it in
Chromium."""

from __future__ import annotations

import re

import pytest
import torch

import slimgraph
from slimgraph.errors import SlimgraphError
from slimgraph.report import BLOCK_NODES, BOX_H, GAP_Y, change_marks, draw

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


def _boxes(svg: str) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y) of its box in a drawing."""
    return {name: (float(x), float(y)) for name, x, y in
            re.findall(r'data-name="([^"]+)"><rect x="([\d.]+)" y="([\d.]+)"', svg)}


def test_a_tall_chain_is_drawn_straight_and_folded_into_columns():
    layers = [m for _ in range(25) for m in (torch.nn.Linear(16, 16), torch.nn.ReLU())]
    graph = slimgraph.import_model(torch.nn.Sequential(*layers).eval(), torch.randn(2, 16))
    names = [n.name for n in graph.nodes]
    boxes = _boxes(draw(graph, names, {}))
    columns = sorted({x for x, _ in boxes.values()})
    assert len(boxes) == 50 and 2 <= len(columns) <= 3  # folded, one straight line of boxes per column
    for a, b in zip(names, names[1:]):  # down a column, then to the top of the next
        (xa, ya), (xb, yb) = boxes[a], boxes[b]
        assert (xb == xa and yb > ya) or (xb > xa and yb < ya)


def test_weights_sit_beside_their_layer_and_the_chain_stays_straight(resnet18_result):
    graphs = resnet18_result.snapshots.graphs()
    quantized = graphs[3]  # after fold-bn, prune, quantize
    names = [n.name for n in quantized.nodes][:BLOCK_NODES]
    boxes = _boxes(draw(quantized, names, {}))
    by_name = {n.name: n for n in quantized.nodes}
    weights = 0
    for name in names:
        node = by_name[name]
        readers = {use.name for v in node.outputs for use in v.users()} & set(names)
        if node.op == "fake_quant" and node.inputs[0].const_value is not None and readers:
            (reader,) = readers  # a weight's fake-quant: one row above its conv, to the right of its input
            weights += 1
            assert boxes[name][1] == boxes[reader][1] - BOX_H - GAP_Y and boxes[name][0] > boxes[reader][0]
    assert weights >= 5
    convs = [n for n in names if by_name[n].op == "conv" and "downsample" not in n]
    assert len({boxes[n][0] for n in convs}) == 1  # the main chain in one column
