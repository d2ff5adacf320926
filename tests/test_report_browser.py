"""The HTML report opened in a real browser: headless Chromium from Debian's packages (.ci/run installs
them), driven by Selenium with the system chromedriver. For resnet18 through
fold-bn,prune{ratio=0.5},quantize,fold-int8 (latency measured) and the real MiniLM through
onnxruntime-int8, what the rendered page shows is checked against the trace: every pass that
changed the graph is drawn, with every changed node marked as what happened to it and the
counts the pass reports; nothing is fetched but the file; a screenshot of each is saved.

Without Chromium these tests fail (they never skip): CI installs it.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

import slimgraph
from slimgraph.report import LABEL_CHARS, MARKS, change_marks
from tests import browser as chromium

torchvision = pytest.importorskip("torchvision")

# what the rendered page holds: per pass section, its drawings' two sides and their nodes
DOM = """
const sections = [...document.querySelectorAll('section.pass')].map(section => ({
  id: section.id,
  title: section.querySelector('h2').textContent,
  error_bars: section.querySelectorAll('svg.layer-errors rect').length,
  drawings: [...section.querySelectorAll('.drawing')].map(drawing =>
    [...drawing.querySelectorAll('.side')].map(side => ({
      svgs: [...side.querySelectorAll('svg')].map(svg => {
        const box = svg.getBoundingClientRect();
        return [box.width, box.height];
      }),
      nodes: [...side.querySelectorAll('g.node')].map(g => ({
        mark: g.classList[1], name: g.dataset.name, box: g.querySelector('rect').getBoundingClientRect().width,
        fill: getComputedStyle(g.querySelector('rect')).fill,
        lines: [...g.querySelectorAll('text')].map(t => t.textContent)})),
    }))),
}));
const chart = document.querySelector('svg.chart');
return {
  sections: sections,
  series: Object.fromEntries([...chart.querySelectorAll('g.series')].map(
    g => [g.dataset.series, g.querySelectorAll('circle').length])),
  error_bars: [...chart.querySelectorAll('g.errors rect')].map(r => Number(r.dataset.pass)),
};
"""


@pytest.fixture(scope="module")
def browser():
    why = chromium.missing()
    if why:
        pytest.fail(why, pytrace=False)
    driver = chromium.start()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    calibration = [torch.randn(1, 3, 64, 64) for _ in range(2)]
    result = slimgraph.optimize(model, "fold-bn,prune{ratio=0.5},quantize,fold-int8", example_inputs=x,
                                calibration_data=calibration, measure="onnxruntime")
    return result, result.report(tmp_path_factory.mktemp("resnet18") / "report.html")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    from tests.realdata.minilm import load_minilm, real_sentences

    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    sentences = real_sentences(6)
    tokens = dict(return_tensors="pt", truncation=True, max_length=32)  # short: quick to calibrate
    inputs = dict(tokenizer(sentences[:2], padding=True, **tokens))
    dims = {name: {0: "batch", 1: "seq"} for name in inputs}
    calibration = [tuple(dict(tokenizer([s], **tokens))[name] for name in inputs) for s in sentences[2:]]
    result = slimgraph.optimize(model, "onnxruntime-int8", example_inputs=inputs, dynamic_dims=dims,
                                calibration_data=calibration)
    return result, result.report(tmp_path_factory.mktemp("minilm") / "report.html")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


MODELS = ["resnet18", pytest.param("minilm", marks=pytest.mark.heavy)]  # MiniLM's preset calibrates for ~20 s


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "\u2026"


def _drawn(page: dict, index: int) -> tuple[list[dict], list[dict], dict]:
    """The nodes drawn before and after in pass ``index``'s section, and the section."""
    (section,) = [s for s in page["sections"] if s["id"] == f"pass-{index}"]
    before = [n for d in section["drawings"] for n in d[0]["nodes"]]
    after = [n for d in section["drawings"] for n in d[1]["nodes"]]
    return before, after, section


def _count(nodes: list[dict], mark: str, op: str) -> int:
    return sum(1 for n in nodes if n["mark"] == mark and n["lines"][0] == op)


def test_the_request_recorder_sees_what_a_page_fetches(browser, tmp_path):
    """The control for the no-network test: a page that does fetch is seen fetching."""
    page = tmp_path / "fetches.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="http://127.0.0.1:9/style.css">'
                    '</head><body><img src="http://127.0.0.1:9/image.png"></body></html>')
    urls = chromium.open_page(browser, page)
    assert page.resolve().as_uri() in urls
    assert {"http://127.0.0.1:9/style.css", "http://127.0.0.1:9/image.png"} <= set(urls)


@pytest.mark.parametrize("model", MODELS)
def test_nothing_is_fetched_but_the_file(browser, model, request):
    _, path = request.getfixturevalue(model)
    assert chromium.open_page(browser, path) == [path.resolve().as_uri()]


@pytest.mark.parametrize("model", MODELS)
def test_every_changed_pass_is_drawn_with_its_changes_marked(browser, model, request):
    result, path = request.getfixturevalue(model)
    chromium.open_page(browser, path)
    page = browser.execute_script(DOM)
    graphs = result.snapshots.graphs()
    changed = [i for i, r in enumerate(result.trace, 1) if r.changed]
    assert len(changed) >= 4
    assert [s["id"] for s in page["sections"]] == [f"pass-{i}" for i in changed]
    for i in changed:
        record = result.trace[i - 1]
        before, after, section = _drawn(page, i)
        assert section["title"] == f"{i}. {record.pipeline_item or record.name}"
        sides = [side for drawing in section["drawings"] for side in drawing]
        assert section["drawings"] and all(w > 0 and h > 0 for side in sides for w, h in side["svgs"])
        marks_before, marks_after = change_marks(graphs[i - 1], graphs[i])
        for drawn, marks, graph in ((before, marks_before, graphs[i - 1]), (after, marks_after, graphs[i])):
            assert {(n["name"], n["mark"]) for n in drawn if n["mark"] != "context"} == set(marks.items()), record.name
            assert len({n["name"] for n in drawn}) == len(drawn)  # each node once
            nodes = {n.name: n for n in graph.nodes}
            for n in drawn:  # op, output type and name as the graph has them, in the mark's colour, rendered
                node = nodes[n["name"]]
                assert n["lines"] == [_label(node.op), _label(node.outputs[0].type_str()), _label(node.name)]
                r, g, b = (int(h, 16) for h in re.findall("..", MARKS[n["mark"]][1:]))
                assert n["fill"] == f"rgb({r}, {g}, {b})" and n["box"] > 0
        removed = sum(1 for n in before if n["mark"] == "removed")
        added = sum(1 for n in after if n["mark"] == "added")
        assert removed - added == record.stats_before["nodes"] - record.stats_after["nodes"], record.name
        values = {v.name for n in graphs[i].nodes for v in n.outputs}
        assert section["error_bars"] == len(values & set(record.layer_errors)), record.name
        _check_what_the_pass_says(record, before, after)


def _check_what_the_pass_says(record, before: list[dict], after: list[dict]) -> None:
    """The marked nodes agree with the counts in the pass's own stats."""
    stats = record.pass_stats
    if record.name == "fold-bn":
        assert _count(before, "removed", "batch_norm") == stats["into_previous"] + stats["into_next"] > 0
    elif record.name == "prune":
        changed = {n["name"]: n for n in after if n["mark"] == "changed"}
        for group in stats["per_group"]:
            for layer in group["layers"]:  # drawn changed, its output channels as many as kept
                shape = re.fullmatch(r"\w+\[(.*)\]", changed[layer]["lines"][1]).group(1).split(",")
                assert int(shape[1]) == group["channels"] - group["removed"], layer
    elif record.name == "quantize" and stats.get("activations") == "dynamic (per tensor, uint8)":
        assert _count(after, "added", "dynamic_quant_matmul") == stats["quantized_ops"] > 0
        assert _count(before, "removed", "linear") == stats["quantized_ops"]
        kept = {n["name"] for n in before if n["mark"] == "removed"} & set(stats["kept_float_by_auto"])
        assert not kept
    elif record.name == "quantize":
        assert _count(after, "added", "fake_quant") == stats["activations"] + stats["weights"] > 0
    elif record.name == "fold-int8":
        assert _count(after, "added", "quantize_linear") == stats["activations"] > 0
        assert _count(after, "added", "dequantize_linear") == stats["activations"] + stats["weights"] + stats["biases"]
        assert _count(before, "removed", "fake_quant") == stats["activations"] + stats["weights"]
    elif record.name == "smooth":
        assert _count(after, "added", "mul") == stats["smoothed"] == len(stats["mul"]) > 0
    elif record.name == "floor-softmax":
        marked = {n["name"]: n for n in after if n["mark"] in ("added", "changed")}  # added: a written-out attention's
        assert all(marked[name]["lines"][0] == "softmax" for name in stats["floored"])
        assert _count(after, "added", "maximum") == len(stats["floored"]) > 0
        # a row max per floor, and one per written-out masked attention (its rows that attend to nothing are 0)
        assert _count(after, "added", "amax") == len(stats["floored"]) + len(stats.get("written_out", []))


@pytest.mark.parametrize("model", MODELS)
def test_the_chart_shows_every_measure(browser, model, request):
    result, path = request.getfixturevalue(model)
    chromium.open_page(browser, path)
    page = browser.execute_script(DOM)
    points = len(result.trace) + 1  # before the first pass, then after each
    want = {"params": points, "macs": points, "nodes": points}
    if any(r.latency_ms is not None for r in result.trace):
        want["latency"] = points
    assert page["series"] == want
    assert ("latency" in want) == (model == "resnet18")  # measured there only
    assert page["error_bars"] == [i for i, r in enumerate(result.trace, 1) if r.max_rel_error is not None]


@pytest.mark.parametrize("model", MODELS)
def test_screenshots(browser, model, request, tmp_path_factory):
    """The top of the report and each pass's first drawing, saved as PNGs: not blank, the marks'
    colours on screen."""
    result, path = request.getfixturevalue(model)
    folder = tmp_path_factory.mktemp(f"screenshots_{model}")
    chromium.open_page(browser, path)
    shots = {"top": browser.get_screenshot_as_png()}
    for i, record in enumerate(result.trace, 1):
        if record.changed:
            browser.execute_script(f"document.querySelector('.drawing[data-pass=\"{i}\"]').scrollIntoView()")
            shots[f"pass{i}"] = browser.get_screenshot_as_png()
    marked = {tuple(int(h, 16) for h in re.findall("..", MARKS[m][1:])) for m in ("removed", "added", "changed")}
    for name, png in shots.items():
        (folder / f"{name}.png").write_bytes(png)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (1400, 1000)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.uint32)
        colours, counts = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2], return_counts=True)
        assert len(colours) > 20 and counts.max() < 0.97 * len(pixels), name  # not one colour, not blank
        if name != "top":  # a changed node on screen, in its colour
            assert marked & {(int(c) >> 16, int(c) >> 8 & 255, int(c) & 255) for c in colours}, name
