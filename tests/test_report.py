"""report.html beside every artifact: drawn from the manifest, self-contained, and rendered by a real browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import HOST_X86
from edgeq.cli import main
from edgeq.report import render

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
INT8_BARS, FLOAT_BARS = (0xCC, 0x66, 0x00), (0x88, 0x99, 0xBB)


def _compile(conv_onnx, conv_feeds, out):
    result = CliRunner().invoke(main, ["compile", str(conv_onnx), "-t", HOST_X86, "--calib", str(conv_feeds),
                                       "-o", str(out), "--repeats", "20"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    return json.loads((out / "manifest.json").read_text()), (out / "report.html").read_text()


def test_every_compile_writes_a_self_contained_report(tmp_path, conv_onnx, conv_feeds):
    manifest, page = _compile(conv_onnx, conv_feeds, tmp_path / "out")
    assert "report.html" in manifest["files"] and "report.html" in manifest["sha256"]
    for heading in ("Summary", "Outputs", "Candidates", "Time per node", "Layers"):
        assert f"<h2>{heading}" in page
    assert "<script" not in page and not re.search(r'\s(src|href)=', page)  # nothing fetched, nothing run
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) == {"http://www.w3.org/2000/svg"}  # a namespace
    for name, decision in manifest["quantization"]["decisions"].items():
        if decision["op_type"] in ("Conv", "Gemm"):
            assert f"<td>{name}</td>" in page
    drawn_from = {k: v for k, v in manifest.items() if k not in ("files", "sha256")}  # added after it was drawn
    assert render(drawn_from, f"edgeq: conv.onnx on {HOST_X86}") == page  # the manifest alone makes the page


def test_a_replay_or_unmeasured_compile_reports_what_it_has(tmp_path, conv_onnx, conv_feeds):
    result = CliRunner().invoke(main, ["compile", str(conv_onnx), "-t", HOST_X86, "--calib", str(conv_feeds),
                                       "-o", str(tmp_path / "out"), "--no-measure"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert "latency not measured" in page and "<h2>Time per node" not in page and "<h2>Layers" in page


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS), reason="needs a headless Chromium")
def test_the_report_renders_in_a_headless_browser(tmp_path, conv_onnx, conv_feeds):
    _compile(conv_onnx, conv_feeds, tmp_path / "out")
    browser = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,3000", (tmp_path / "out" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for color in (INT8_BARS, FLOAT_BARS):  # the per-node bars of both builds were drawn
        assert (np.abs(pixels - color).sum(axis=1) < 12).sum() > 200, color
