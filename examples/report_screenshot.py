"""The README's picture of the HTML report: resnet18 (random init) through
fold-bn,prune{ratio=0.5},quantize,fold-int8, the report opened in headless Chromium (Debian's
chromium and chromium-driver packages): its top (summary, chart), then quantize's per-layer error
and the drawing of its change, one PNG.

Usage (from the repository root): python -m examples.report_screenshot [--out docs/report.png]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch
import torchvision
from PIL import Image

import slimgraph
from tests import browser as chromium

PIPELINE = "fold-bn,prune{ratio=0.5},quantize,fold-int8"
WIDTH, DRAWING_HEIGHT = 1240, 720


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/report.png")
    args = parser.parse_args()
    if why := chromium.missing():
        raise SystemExit(why)
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224)
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(4)]
    result = slimgraph.optimize(model, PIPELINE, example_inputs=x, calibration_data=calibration)
    quantize = 1 + [r.name for r in result.trace].index("quantize")
    driver = chromium.start(WIDTH, 1000)
    try:
        with tempfile.TemporaryDirectory() as folder:
            chromium.open_page(driver, result.report(Path(folder) / "report.html"))
            # the summary and the chart; quantize's heading and first line; its per-layer error, its drawing
            parts = [_shot(driver, "body", "svg.chart"),
                     _shot(driver, f"#pass-{quantize} h2", f"#pass-{quantize} p"),
                     _shot(driver, f"#pass-{quantize} > h4", None)]
    finally:
        driver.quit()
    page = Image.new("RGB", (WIDTH, sum(p.height for p in parts)), "white")
    for i, part in enumerate(parts):
        page.paste(part, (0, sum(p.height for p in parts[:i])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {page.width}x{page.height})")


def _shot(driver, start: str, end: str | None) -> Image.Image:
    """The viewport scrolled to just above ``start``, down to just below ``end`` (DRAWING_HEIGHT without)."""
    driver.execute_script(f"document.querySelector('{start}').scrollIntoView(); window.scrollBy(0, -10)")
    bottom = DRAWING_HEIGHT
    if end is not None:
        bottom = driver.execute_script(f"return document.querySelector('{end}').getBoundingClientRect().bottom") + 10
    return Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB").crop((0, 0, WIDTH, int(bottom)))


if __name__ == "__main__":
    main()
