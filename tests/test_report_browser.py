"""The report as a person sees it: opened from disk in a real headless Chromium (Debian ``chromium``).

Checks a screenshot is taken, every image decoded (``naturalWidth > 0``), no console message or page
error was logged, and the verdict and tables are in the rendered DOM. A control page with a broken
image and a console error proves the checks can fail. Skipped only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_report import write_niah_dir

from ctxaware.report import build_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (/usr/bin/chromium)")

PROBE = """<script>
window.__errs = [];
window.addEventListener('error', e => __errs.push(String(e.message || (e.target && e.target.src))), true);
const oe = console.error; console.error = (...a) => { __errs.push(a.join(' ')); oe(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const d = document.createElement('pre'); d.id = 'probe';
  d.textContent = JSON.stringify({images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length, errors: __errs,
    verdict: document.querySelectorAll('ul.verdict li').length, tables: document.querySelectorAll('table').length,
    text: document.body.innerText.slice(0, 20000)});
  document.body.appendChild(d);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def _open(tmp: Path, page: Path) -> tuple[dict, list[str]]:
    """(probe result of a probed copy, console lines of the page itself)."""
    probed = page.with_name("probed_" + page.name)
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = _chromium(tmp, "--dump-dom", probed.as_uri()).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, "the probe did not run: no load event?"
    import html

    result = json.loads(html.unescape(m.group(1)))
    plain = _chromium(tmp, "--dump-dom", page.as_uri())
    console = [ln for ln in plain.stderr.splitlines() if ":CONSOLE" in ln]
    return result, console


def test_control_page_fails_the_checks(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><head></head><body><img src="missing.png"><script>console.error("boom")</script>'
                   '</body></html>')
    result, console = _open(tmp_path, bad)
    assert result["broken"] == 1 and any("boom" in ln for ln in console)


def test_report_opens_in_chromium_with_images_and_no_console_error(tmp_path):
    a = write_niah_dir(tmp_path / "a", "model-a", 0)
    b = write_niah_dir(tmp_path / "b", "model-b", 1)
    page = build_report([a, b], tmp_path / "report.html")
    result, console = _open(tmp_path, page)
    assert console == [] and result["errors"] == []
    assert result["images"] == 3 and result["broken"] == 0
    assert result["verdict"] >= 6 and result["tables"] >= 3
    assert "With its chat template (chat+prefix) the model loses the needle in" in result["text"]
    shot = tmp_path / "report.png"
    done = _chromium(tmp_path, "--window-size=1280,3000", f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 3000)
        colours = len(set(im.convert("RGB").resize((128, 300)).getdata()))
    assert colours > 50  # not a blank page: text, tables and heatmaps were painted
