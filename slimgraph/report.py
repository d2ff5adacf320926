"""A self-contained HTML report of a pipeline: ``OptimizeResult.report(path)``.

One file, nothing fetched when it is opened (styles inline, drawings as inline SVG): a summary
table and a chart of params, MACs, nodes, latency and error across the passes; then for each pass
that changed the graph, its stats, its pass_stats as tables, the per-layer error of a lossy pass
as bars along the network's depth, and the region it changed drawn before and after side by side
(removed nodes red, added green, changed amber, a couple of unchanged nodes around them grey),
with the whole graph's printout folded away. Layers are networkx's topological generations; within
a layer a node sits under its inputs (chains stay straight, weights and branches beside them, fewer
crossings than graph order), and a tall, narrow drawing folds into columns; very large changes are
drawn block by block.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable
from pathlib import Path

import networkx as nx

from slimgraph.errors import SlimgraphError
from slimgraph.ir import Graph, Node, print_graph
from slimgraph.ir.printer import format_attr
from slimgraph.passes import PassRecord, Trace

CONTEXT_HOPS = 2  # unchanged nodes drawn around a change
BLOCK_NODES = 60  # a drawing holds at most this many nodes; larger regions are cut into blocks
BOX_W, BOX_H, GAP_X, GAP_Y = 170, 44, 24, 30
WRAP_LAYERS, WRAP_WIDTH, WRAP_GAP = 20, 660, 24  # taller, narrow drawings fold into columns
LABEL_CHARS = 24  # a node's label lines are cut to this many characters (monospace, inside BOX_W)
MARKS = {"removed": "#f4b6b6", "added": "#b9e4b9", "changed": "#f7dc8c", "context": "#eeeeee"}

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
section.pass { border-top: 2px solid #888; margin-top: 28px; padding-top: 8px; }
.tables { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
details > summary { cursor: pointer; margin: 6px 0; font-weight: bold; }
.sides { display: flex; gap: 24px; align-items: flex-start; overflow-x: auto; }
.side h4 { margin: 4px 0; }
svg text { font: 11px monospace; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; border: 1px solid #999; }
svg.chart text { font: 11px system-ui, sans-serif; }
pre { background: #f8f8f8; padding: 8px; overflow-x: auto; font-size: 12px; }
"""

ARROW = ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs><marker id="arrow" '
         'viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto">'
         '<path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs></svg>')


def _node_label(node: Node) -> list[str]:
    out = node.outputs[0].type_str() if node.outputs else ""
    return [node.op, out, node.name]


def _signature(node: Node) -> tuple:
    """What makes a node the same node in two graphs: op, attributes, output types, input names."""
    attrs = tuple(sorted((k, format_attr(v)) for k, v in node.attrs.items() if k != "impl"))
    return (node.op, attrs, tuple(v.type_str() for v in node.outputs),
            tuple(None if v is None else v.name for v in node.inputs))


def change_marks(before: Graph, after: Graph) -> tuple[dict[str, str], dict[str, str]]:
    """Node name -> "removed" / "changed" in ``before`` and "added" / "changed" in ``after``."""
    old = {n.name: n for n in before.nodes}
    new = {n.name: n for n in after.nodes}
    marks_before = {name: "removed" for name in old if name not in new}
    marks_after = {name: "added" for name in new if name not in old}
    for name in old.keys() & new.keys():
        if _signature(old[name]) != _signature(new[name]):
            marks_before[name] = marks_after[name] = "changed"
    return marks_before, marks_after


def _dag(graph: Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for v in node.inputs:
            if v is not None and v.producer is not None:
                g.add_edge(v.producer.name, node.name)
    return g


def _region(dag: nx.DiGraph, marked: Iterable[str]) -> set[str]:
    """The marked nodes and the nodes within CONTEXT_HOPS of them, either direction."""
    region = set(marked)
    frontier = set(region)
    for _ in range(CONTEXT_HOPS):
        frontier = {m for n in frontier for m in (*dag.predecessors(n), *dag.successors(n))} - region
        region |= frontier
    return region


def _blocks(graph: Graph, names: set[str]) -> list[list[str]]:
    """The region's nodes in graph order, cut into blocks of at most BLOCK_NODES."""
    ordered = [n.name for n in graph.nodes if n.name in names]
    return [ordered[i:i + BLOCK_NODES] for i in range(0, len(ordered), BLOCK_NODES)] or [[]]


def _layout(sub: nx.DiGraph, names: list[str]) -> dict[str, tuple[int, int]]:
    """(layer, slot) of each node. Layers are networkx's topological generations, except that a node
    with no inputs drawn sits just above its first reader (a weight's fake-quant beside the conv).
    Within a layer, nodes sit near the median slot of their inputs (inputs that have inputs first;
    readers for a node with none), in that order, two sweeps down: chains stay straight, branches and
    weights go right of them, and edges cross less than in graph order."""
    layer = {n: i for i, generation in enumerate(nx.topological_generations(sub)) for n in generation}
    for n in names:
        if not sub.in_degree(n) and sub.out_degree(n):
            layer[n] = min(layer[m] for m in sub.successors(n)) - 1
    rows: dict[int, list[str]] = {}
    for n in names:  # graph order breaks ties: the drawing stays stable between passes
        rows.setdefault(layer[n], []).append(n)
    slot = {n: i for row in rows.values() for i, n in enumerate(row)}
    for _ in range(2):
        for index in sorted(rows):
            wanted = {}
            for n in rows[index]:
                inputs = list(sub.predecessors(n))
                near = [m for m in inputs if sub.in_degree(m)] or inputs or list(sub.successors(n))
                near = sorted(slot[m] for m in near)
                wanted[n] = near[(len(near) - 1) // 2] if near else slot[n]  # the lower median
            rows[index].sort(key=lambda n: (wanted[n], not sub.in_degree(n)))
            row = rows[index]
            free = 0
            for n in row:  # at its wanted slot or the next free one to its right
                slot[n] = free = max(wanted[n], free)
                free += 1
    return {n: (layer[n], slot[n]) for n in names}


def _edge(a: tuple[float, float], b: tuple[float, float], span: int, gutter: float | None) -> str:
    """An SVG path from the bottom of box ``a`` to the top of box ``b`` (top-left corners): an S to
    the next layer; a longer edge runs down the gap right of the two boxes; with ``gutter``, the edge
    leaves its column, runs up that gap between columns and comes in from the top."""
    sx, sy, tx, ty = a[0] + BOX_W / 2, a[1] + BOX_H, b[0] + BOX_W / 2, b[1]
    q = GAP_Y / 4
    if gutter is not None:
        return (f'<path d="M{sx:.0f},{sy} V{sy + 2 * q:.0f} H{gutter:.0f} V{GAP_Y / 2:.0f} H{tx:.0f} V{ty}" '
                f'class="edge wrap" stroke-dasharray="4 3"/>')
    if span <= 1:
        return (f'<path d="M{sx:.0f},{sy} C{sx:.0f},{sy + 2 * q:.0f} {tx:.0f},{ty - 2 * q:.0f} {tx:.0f},{ty}" '
                'class="edge"/>')
    gx = max(a[0], b[0]) + BOX_W + GAP_X / 2
    return (f'<path d="M{sx:.0f},{sy} C{sx:.0f},{sy + q:.0f} {gx:.0f},{sy + q:.0f} {gx:.0f},{sy + 2 * q:.0f} '
            f'V{ty - 2 * q:.0f} C{gx:.0f},{ty - q:.0f} {tx:.0f},{ty - q:.0f} {tx:.0f},{ty}" class="edge"/>')


def draw(graph: Graph, names: list[str], marks: dict[str, str]) -> str:
    """An SVG of these nodes of ``graph`` and the edges among them, layered top to bottom; a tall,
    narrow drawing folds into side-by-side columns of layers."""
    by_name = {n.name: n for n in graph.nodes}
    sub = _dag(graph).subgraph(names)
    if not sub:
        return "<p>(nothing here)</p>"
    where = _layout(sub, names)
    layers = max(layer for layer, _ in where.values()) + 1
    column_w = (max(s for _, s in where.values()) + 1) * (BOX_W + GAP_X)
    columns = 1
    if layers > WRAP_LAYERS:
        fit = (WRAP_WIDTH + WRAP_GAP) // (column_w + WRAP_GAP)  # before and after side by side in 1400 px
        columns = max(1, min(math.ceil(layers / (WRAP_LAYERS * 3 // 4)), fit))
    per_column = math.ceil(layers / columns)
    columns = math.ceil(layers / per_column)
    pos = {n: (GAP_X + (layer // per_column) * (column_w + WRAP_GAP) + s * (BOX_W + GAP_X),
               GAP_Y + (layer % per_column) * (BOX_H + GAP_Y)) for n, (layer, s) in where.items()}
    width = columns * (column_w + WRAP_GAP) - WRAP_GAP + GAP_X
    height = min(per_column, layers) * (BOX_H + GAP_Y) + GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img"><g fill="none" stroke="#777" marker-end="url(#arrow)">']
    for a, b in sub.edges:
        column = where[a][0] // per_column
        gutter = None
        if column != where[b][0] // per_column:
            gutter = GAP_X + (column + 1) * (column_w + WRAP_GAP) - WRAP_GAP / 2 - GAP_X / 2
        parts.append(_edge(pos[a], pos[b], where[b][0] - where[a][0], gutter))
    parts.append("</g>")
    for name in names:
        x, y = pos[name]
        mark = marks.get(name, "context")
        parts.append(f'<g class="node {mark}" data-name="{html.escape(name)}">'
                     f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{MARKS[mark]}" '
                     f'stroke="#555"/>')
        for i, line in enumerate(_node_label(by_name[name])):
            text = _short(line, LABEL_CHARS)
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{x + 6}" y="{y + 13 + 13 * i}"{weight}>{html.escape(text)}</text>')
        parts.append(f"<title>{html.escape(name)}</title></g>")
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[list[object]], header: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _cell(value: object, depth: int = 0) -> str:
    """A stat as one table cell: floats to 4 digits, long lists cut short with their length."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v, depth + 1)}" for k, v in value.items()) if depth < 2 else f"{len(value)} keys"
    if isinstance(value, (list, tuple)):
        if len(value) > 8 or depth >= 2:
            return f"{len(value)} items: " + ", ".join(_cell(v, 2) for v in value[:4]) + ", \u2026"
        return ", ".join(_cell(v, depth + 1) for v in value)
    return str(value)


def _folded(key: str, count: int, table: str) -> str:
    """A per-layer stat's table, folded away when it is long."""
    open_ = " open" if count <= 12 else ""
    return f"<details{open_}><summary>{html.escape(key)} ({count})</summary>{table}</details>"


def _stats_tables(stats: dict) -> tuple[str, str]:
    """pass_stats as tables: the scalars in one; then a dict (per layer) as rows of key and value,
    a list of dicts (per group) as rows with a column per key, a list as lines."""
    scalars = [[k, _cell(v)] for k, v in stats.items() if not isinstance(v, (dict, list, tuple))]
    out = []
    for key, value in stats.items():
        if isinstance(value, dict) and value:
            rows = [[k, _cell(v)] for k, v in list(value.items())[:200]]
            out.append(_folded(key, len(value), _table(rows, ["", key])))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            rows = [[_cell(v.get(c, "")) for c in columns] for v in value[:200]]
            out.append(_folded(key, len(value), _table(rows, columns)))
        elif isinstance(value, (list, tuple)) and value:
            out.append(f"<h4>{html.escape(key)} ({len(value)})</h4><ul>" + "".join(
                f"<li>{html.escape(_cell(v, 1))}</li>" for v in value[:200]) + "</ul>")
    return (_table(scalars, ["stat", "value"]) if scalars else ""), "".join(out)


def _bars(graph: Graph, errors: dict[str, float]) -> str:
    """Per-layer error as bars in the network's order (depth left to right), worst labelled."""
    order = [v.name for n in graph.nodes for v in n.outputs if v.name in errors]
    if not order:
        return ""
    top = max(errors.values()) or 1.0
    w, h = max(4, min(12, 900 // len(order))), 120
    bars = "".join(f'<rect x="{i * w}" y="{h - h * errors[name] / top:.1f}" width="{w - 1}" '
                   f'height="{h * errors[name] / top:.1f}" fill="#c0504d" data-value="{html.escape(name)}">'
                   f'<title>{html.escape(name)}: {errors[name]:.3g}</title></rect>' for i, name in enumerate(order))
    worst = ", ".join(f"{html.escape(k)} {v:.3g}" for k, v in list(errors.items())[:5])
    return (f"<h4>relative error per value, input to output (worst: {worst})</h4>"
            f'<svg xmlns="http://www.w3.org/2000/svg" class="layer-errors" width="{len(order) * w}" height="{h}">'
            f"{bars}</svg>")


def _short(text: str, size: int = 16) -> str:
    return text if len(text) <= size else text[:size - 1] + "\u2026"


def _chart(trace: Trace) -> str:
    """Params, MACs, nodes and (when measured) latency after each pass, each relative to its value
    before the first pass; below them, each pass's max relative error on a log scale."""
    if not len(trace):
        return ""
    names = ["input"] + [r.pipeline_item or r.name for r in trace]
    series = {key: [trace[0].stats_before.get(key)] + [r.stats_after.get(key) for r in trace]
              for key in ("params", "macs", "nodes")}
    if any(r.latency_ms is not None for r in trace):
        series["latency"] = [trace.input_latency_ms] + [r.latency_ms for r in trace]
    colours = {"params": "#4472c4", "macs": "#ed7d31", "nodes": "#70ad47", "latency": "#7030a0"}
    ratios = {k: [None if v is None or not vs[0] else v / vs[0] for v in vs] for k, vs in series.items()}
    top = max([1.0] + [r for rs in ratios.values() for r in rs if r is not None])
    top = min(math.ceil(top * 2) / 2, 4.0)
    step = max(90, 600 // len(names))
    left, w, h = 44, step * (len(names) - 1), 180
    y_of = lambda r: 10 + (h - 20) * (1 - min(r, top) / top)  # noqa: E731
    x_of = lambda i: left + i * step  # noqa: E731
    parts = []
    grid = 0.5 if top <= 2 else 1.0
    for k in range(int(top / grid) + 1):
        y = y_of(k * grid)
        parts.append(f'<line x1="{left}" y1="{y:.0f}" x2="{left + w}" y2="{y:.0f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y + 4:.0f}" text-anchor="end" fill="#666">{k * grid * 100:.0f}%</text>')
    for i, name in enumerate(names):
        parts.append(f'<text x="{x_of(i)}" y="{h + 10}" text-anchor="middle" fill="#333">{html.escape(_short(name))}'
                     f"<title>{html.escape(name)}</title></text>")
    labels = []
    for key, rs in ratios.items():
        points = [(x_of(i), y_of(r), i, r) for i, r in enumerate(rs) if r is not None]
        if not points:
            continue
        dots = "".join(f'<circle cx="{x}" cy="{y:.1f}" r="3"><title>{key} after {html.escape(names[i])}: '
                       f"{series[key][i]:.4g} ({r:.0%})</title></circle>" for x, y, i, r in points)
        line = " ".join(f"{x},{y:.1f}" for x, y, _, _ in points)
        parts.append(f'<g class="series" data-series="{key}" stroke="{colours[key]}" fill="{colours[key]}">'
                     f'<polyline points="{line}" fill="none" stroke-width="2"/>{dots}</g>')
        labels.append([points[-1][1], f"{key} {points[-1][3]:.0%}", colours[key]])
    labels.sort()
    for i in range(1, len(labels)):  # end labels never overlap, nor go below the 0% line
        labels[i][0] = max(labels[i][0], labels[i - 1][0] + 13)
    for i in reversed(range(len(labels))):
        labels[i][0] = min(labels[i][0], y_of(0) if i == len(labels) - 1 else labels[i + 1][0] - 13)
    parts += [f'<text x="{left + w + 8}" y="{y + 4:.0f}" fill="{c}">{html.escape(t)}</text>' for y, t, c in labels]
    chart_h = h + 16
    errors = [(i + 1, r.max_rel_error, r.max_abs_error) for i, r in enumerate(trace) if r.max_rel_error is not None]
    if errors:  # log scale from 1e-8 to the worst, one bar per pass
        eh, y0 = 60, chart_h + 24
        low = -8
        high = max(0, math.ceil(math.log10(max(max(e for _, e, _ in errors), 1e-8))))
        parts.append(f'<text x="{left}" y="{y0 - 8}" fill="#666">max relative error of each pass (log scale)</text>'
                     f'<line x1="{left}" y1="{y0 + eh}" x2="{left + w}" y2="{y0 + eh}" stroke="#999"/>')
        bars = []
        for i, rel, absolute in errors:
            size = eh * (max(math.log10(rel), low) - low) / (high - low) if rel > 0 else 0
            bars.append(f'<rect x="{x_of(i) - 8}" y="{y0 + eh - size:.1f}" width="16" height="{size:.1f}" '
                        f'data-pass="{i}"><title>{html.escape(names[i])}: max relative error {rel:.3g}, '
                        f"absolute {absolute:.3g}</title></rect>"
                        f'<text x="{x_of(i) + 11}" y="{y0 + eh - 2}" fill="#c0504d">{rel:.2g}</text>')
        parts.append(f'<g class="errors" fill="#c0504d">{"".join(bars)}</g>')
        chart_h = y0 + eh + 6
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{left + w + 110}" height="{chart_h}" '
            f'role="img">{"".join(parts)}</svg>')


def _pass_section(index: int, record: PassRecord, before: Graph, after: Graph) -> str:
    marks_before, marks_after = change_marks(before, after)
    region_before = _region(_dag(before), marks_before) | (set(marks_after) & {n.name for n in before.nodes})
    region_after = _region(_dag(after), marks_after) | (set(marks_before) & {n.name for n in after.nodes})
    counts = {m: sum(1 for v in {**marks_before, **marks_after}.values() if v == m) for m in MARKS if m != "context"}
    title = html.escape(record.pipeline_item or record.name)
    out = [f'<section class="pass" id="pass-{index}"><h2>{index}. {title}</h2>',
           f"<p>{counts['removed']} nodes removed, {counts['added']} added, {counts['changed']} changed; "
           f"{record.seconds * 1000:.1f} ms"
           + (f"; max abs error {record.max_abs_error:.3g}" if record.max_abs_error is not None else "")
           + (f"; latency {record.latency_ms:.2f} ms" if record.latency_ms is not None else "") + "</p>"]
    keys = sorted(set(record.stats_before) | set(record.stats_after))
    scalars, per_layer = _stats_tables(record.pass_stats)
    delta = _table([[k, record.stats_before.get(k, "-"), record.stats_after.get(k, "-")] for k in keys],
                   ["", "before", "after"])
    out.append(f'<div class="tables">{delta}{scalars}</div>')
    out.append(_bars(after, record.layer_errors))
    blocks_before, blocks_after = _blocks(before, region_before), _blocks(after, region_after)
    for b in range(max(len(blocks_before), len(blocks_after))):
        label = f" (block {b + 1})" if max(len(blocks_before), len(blocks_after)) > 1 else ""
        left = draw(before, blocks_before[b], marks_before) if b < len(blocks_before) else ""
        right = draw(after, blocks_after[b], marks_after) if b < len(blocks_after) else ""
        out.append(f'<div class="sides drawing" data-pass="{index}"><div class="side"><h4>before{label}</h4>{left}'
                   f'</div><div class="side"><h4>after{label}</h4>{right}</div></div>')
    out.append(per_layer)
    out.append(f"<details><summary>the whole graph after {title}</summary>"
               f"<pre>{html.escape(print_graph(after, constants=False))}</pre></details></section>")
    return "".join(out)


def render(trace: Trace, graphs: list[Graph], title: str = "slimgraph report") -> str:
    """The report's HTML; ``graphs``: the graph before the first pass, then after each pass."""
    if len(graphs) != len(trace) + 1:
        raise SlimgraphError(f"the report needs the graph before and after each of {len(trace)} passes")
    legend = "".join(f'<span style="background:{c}">{m}</span>' for m, c in MARKS.items())
    summary = trace.summary().split("\n")
    body = [ARROW, f"<h1>{html.escape(title)}</h1>", f'<p class="legend">{legend}</p>',
            f"<pre>{html.escape(chr(10).join(summary))}</pre>", _chart(trace)]
    for i, record in enumerate(trace, 1):
        if record.changed:
            body.append(_pass_section(i, record, graphs[i - 1], graphs[i]))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def write_report(trace: Trace, graphs: list[Graph], path: str | os.PathLike, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise SlimgraphError(f"{path} already exists (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(trace, graphs, f"slimgraph: {graphs[0].name}"), encoding="utf-8")
    return path
