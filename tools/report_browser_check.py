"""Open a report page in a real headless browser (Chromium) and check what a reader sees.

    python -m tools.report_browser_check RUN_DIR/report/index.html [--screenshot out.png]

The report itself has no script. A small wrapper page, written beside the report in a temporary
directory, loads it in an iframe and, once it has loaded, counts every table's body rows and checks
that every image decoded (``naturalWidth > 0``); Chromium's ``--dump-dom`` prints the wrapper with
those results. Exit 0 when the page rendered, has the verdict, the suspect table has rows and all
images loaded; 1 with the reason otherwise; 2 when no Chromium is installed (``$CHROMIUM`` or
chromium / chromium-browser / google-chrome on PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_WRAPPER = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<iframe id="r" src="%(src)s" style="width:1280px;height:2000px"></iframe>
<pre id="out">pending</pre>
<script>
document.getElementById("r").addEventListener("load", function () {
  var d = this.contentDocument;
  var imgs = Array.from(d.images);
  function done() {
    var tables = Array.from(d.querySelectorAll("table")).map(function (t) { return t.rows.length - 1; });
    var res = {title: d.title, h2: Array.from(d.querySelectorAll("h2")).map(function (h) { return h.textContent; }),
               tables: tables, images: imgs.length,
               broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.getAttribute("src"); }),
               verdict: (d.querySelector(".verdict") || {}).textContent || ""};
    document.getElementById("out").textContent = "RESULT " + JSON.stringify(res);
  }
  done();  // an iframe's load event fires after its images have loaded or failed
});
</script></body></html>
"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check(page: str, screenshot: str | None = None, timeout: float = 120.0) -> dict:
    """Render ``page`` in headless Chromium; returns what the wrapper measured (see module doc)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found: install chromium, or set $CHROMIUM")
    page = os.path.abspath(page)
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", "--window-size=1280,2000"]
    with tempfile.TemporaryDirectory() as tmp:
        wrapper = os.path.join(tmp, "wrapper.html")
        with open(wrapper, "w") as f:
            f.write(_WRAPPER % {"src": "file://" + page})
        for attempt, budget in enumerate((10_000, 30_000, 60_000)):  # a loaded machine can need more virtual time
            proc = subprocess.run([chromium, *flags, f"--virtual-time-budget={budget}", f"--user-data-dir={tmp}/profile{attempt}",
                                   "--dump-dom", "file://" + wrapper], capture_output=True, text=True, timeout=timeout)
            if "RESULT {" in proc.stdout:
                break
        if screenshot:
            subprocess.run([chromium, *flags, "--virtual-time-budget=10000", f"--user-data-dir={tmp}/profile_shot",
                            f"--screenshot={os.path.abspath(screenshot)}",
                            "file://" + page], capture_output=True, text=True, timeout=timeout)
    m = re.search(r"RESULT (\{.*\})", proc.stdout)
    if not m:
        raise RuntimeError(f"the browser did not report (exit {proc.returncode}): {proc.stderr.strip()[-1000:]}")
    import html

    return json.loads(html.unescape(m.group(1)))


def problems(res: dict) -> list[str]:
    out = []
    if "Verdict" not in res["h2"] or not res["verdict"].strip():
        out.append("no verdict")
    if "Suspect pairs" not in res["h2"]:
        out.append("no suspect-pair section")
    elif not res["tables"] or res["tables"][0] < 1:
        out.append("the suspect table has no rows")
    if res["images"] == 0:
        out.append("no images")
    if res["broken"]:
        out.append(f"images that did not load: {res['broken']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page")
    ap.add_argument("--screenshot", default=None)
    a = ap.parse_args(argv)
    try:
        res = check(a.page, a.screenshot)
    except FileNotFoundError as e:
        print(f"report_browser_check: {e}", file=sys.stderr)
        return 2
    bad = problems(res)
    print(json.dumps(res))
    if bad:
        print("report_browser_check: " + "; ".join(bad), file=sys.stderr)
        return 1
    print(f"report_browser_check: rendered; tables with {res['tables']} rows; {res['images']} images loaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
