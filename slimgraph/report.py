"""A self-contained HTML report of a pipeline: ``OptimizeResult.report(path)``.

One file, nothing fetched when it is opened (styles inline, drawings as inline SVG): a summary
table and a chart of params, MACs, nodes, latency and error across the passes; then for each pass
that changed the graph, its stats, its pass_stats as tables, the per-layer error of a lossy pass
as bars along the network's depth, and the region it changed drawn before and after side by side
(removed nodes red, added green, changed amber, a couple of unchanged nodes around them grey),
with the whole graph's printout folded away. Layouts come from networkx (layers by topological
generation); very large changes are drawn block by block.
"""

from __future__ import annotations

import html
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
BOX_W, BOX_H, GAP_X, GAP_Y = 170, 44, 24, 34
MARKS = {"removed": "#f4b6b6", "added": "#b9e4b9", "changed": "#f7dc8c", "context": "#eeeeee"}

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
section.pass { border-top: 2px solid #888; margin-top: 28px; padding-top: 8px; }
.sides { display: flex; gap: 24px; align-items: flex-start; overflow-x: auto; }
.side h4 { margin: 4px 0; }
svg text { font: 11px monospace; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; border: 1px solid #999; }
pre { background: #f8f8f8; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


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


def draw(graph: Graph, names: list[str], marks: dict[str, str]) -> str:
    """An SVG of these nodes of ``graph`` and the edges among them, layered top to bottom."""
    by_name = {n.name: n for n in graph.nodes}
    sub = _dag(graph).subgraph(names).copy()
    if not sub:
        return "<p>(nothing here)</p>"
    for layer, generation in enumerate(nx.topological_generations(sub)):
        for name in generation:
            sub.nodes[name]["layer"] = layer
    rows: dict[int, list[str]] = {}
    for name in names:  # graph order within a layer keeps the drawing stable between passes
        rows.setdefault(sub.nodes[name]["layer"], []).append(name)
    width = max(len(r) for r in rows.values()) * (BOX_W + GAP_X) + GAP_X
    height = len(rows) * (BOX_H + GAP_Y) + GAP_Y
    pos = {name: (GAP_X + i * (BOX_W + GAP_X), GAP_Y + layer * (BOX_H + GAP_Y))
           for layer, row in rows.items() for i, name in enumerate(row)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">']
    for a, b in sub.edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        parts.append(f'<line x1="{xa + BOX_W / 2}" y1="{ya + BOX_H}" x2="{xb + BOX_W / 2}" y2="{yb}" '
                     f'stroke="#777" stroke-width="1"/>')
    for name in names:
        x, y = pos[name]
        mark = marks.get(name, "context")
        parts.append(f'<g class="node {mark}" data-name="{html.escape(name)}">'
                     f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{MARKS[mark]}" '
                     f'stroke="#555"/>')
        for i, line in enumerate(_node_label(by_name[name])):
            text = line if len(line) <= 26 else line[:25] + "\u2026"
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{x + 6}" y="{y + 13 + 13 * i}"{weight}>{html.escape(text)}</text>')
        parts.append(f"<title>{html.escape(name)}</title></g>")
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[list[object]], header: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _stats_tables(stats: dict) -> str:
    """pass_stats as tables: scalars in one, each dict (per layer) in its own, lists as lines."""
    scalars = [[k, v] for k, v in stats.items() if not isinstance(v, (dict, list, tuple))]
    out = [_table(scalars, ["stat", "value"])] if scalars else []
    for key, value in stats.items():
        if isinstance(value, dict) and value:
            rows = [[k, v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())]
                    for k, v in list(value.items())[:200]]
            out.append(f"<h4>{html.escape(key)}</h4>" + _table(rows, ["", key]))
        elif isinstance(value, (list, tuple)) and value:
            out.append(f"<h4>{html.escape(key)}</h4><ul>" + "".join(
                f"<li>{html.escape(str(v))}</li>" for v in value[:200]) + "</ul>")
    return "".join(out)


def _bars(graph: Graph, errors: dict[str, float]) -> str:
    """Per-layer error as bars in the network's order (depth left to right), worst labelled."""
    order = [v.name for n in graph.nodes for v in n.outputs if v.name in errors]
    if not order:
        return ""
    top = max(errors.values()) or 1.0
    w, h = max(4, min(12, 900 // len(order))), 120
    bars = "".join(f'<rect x="{i * w}" y="{h - h * errors[name] / top:.1f}" width="{w - 1}" '
                   f'height="{h * errors[name] / top:.1f}" fill="#c0504d"><title>{html.escape(name)}: '
                   f'{errors[name]:.3g}</title></rect>' for i, name in enumerate(order))
    worst = ", ".join(f"{html.escape(k)} {v:.3g}" for k, v in list(errors.items())[:5])
    return (f"<h4>relative error per value, input to output (worst: {worst})</h4>"
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(order) * w}" height="{h}">{bars}</svg>')


def _chart(trace: Trace) -> str:
    """Params, MACs and nodes after each pass, each relative to its value before the first."""
    if not len(trace):
        return ""
    series = {"params": "#4472c4", "macs": "#ed7d31", "nodes": "#70ad47"}
    w, h, step = 600, 160, 600 / max(len(trace), 1)
    lines = []
    for key, colour in series.items():
        start = trace[0].stats_before.get(key) or 1
        points = [(0, trace[0].stats_before.get(key, 0))] + [
            ((i + 1) * step, r.stats_after.get(key, 0)) for i, r in enumerate(trace)]
        coords = " ".join(f"{x:.0f},{h - 10 - (h - 20) * min(v / start, 1.5) / 1.5:.0f}" for x, v in points)
        lines.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{w + 6}" y="{h - 10 - (h - 20) * min(points[-1][1] / start, 1.5) / 1.5:.0f}" '
                     f'fill="{colour}">{key}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 70}" height="{h}" role="img">'
            f'<line x1="0" y1="{h - 10}" x2="{w}" y2="{h - 10}" stroke="#999"/>{"".join(lines)}</svg>')


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
    out.append(_table([[k, record.stats_before.get(k, "-"), record.stats_after.get(k, "-")] for k in keys],
                      ["", "before", "after"]))
    out.append(_stats_tables(record.pass_stats))
    out.append(_bars(after, record.layer_errors))
    blocks_before, blocks_after = _blocks(before, region_before), _blocks(after, region_after)
    for b in range(max(len(blocks_before), len(blocks_after))):
        label = f" (block {b + 1})" if max(len(blocks_before), len(blocks_after)) > 1 else ""
        left = draw(before, blocks_before[b], marks_before) if b < len(blocks_before) else ""
        right = draw(after, blocks_after[b], marks_after) if b < len(blocks_after) else ""
        out.append(f'<div class="sides drawing" data-pass="{index}"><div class="side"><h4>before{label}</h4>{left}'
                   f'</div><div class="side"><h4>after{label}</h4>{right}</div></div>')
    out.append(f"<details><summary>the whole graph after {title}</summary>"
               f"<pre>{html.escape(print_graph(after, constants=False))}</pre></details></section>")
    return "".join(out)


def render(trace: Trace, graphs: list[Graph], title: str = "slimgraph report") -> str:
    """The report's HTML; ``graphs``: the graph before the first pass, then after each pass."""
    if len(graphs) != len(trace) + 1:
        raise SlimgraphError(f"the report needs the graph before and after each of {len(trace)} passes")
    legend = "".join(f'<span style="background:{c}">{m}</span>' for m, c in MARKS.items())
    summary = trace.summary().split("\n")
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="legend">{legend}</p>',
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
    path.write_text(render(trace, graphs, f"slimgraph: {graphs[0].name}"), encoding="utf-8")
    return path
