#!/usr/bin/env python3
"""Screenshot a sweep report in headless Chromium (Debian's /usr/bin/chromium, offline).

    .venv/bin/python results/screenshot.py runs/NAME/report.html results/report.png [--width 1300] [--height 0]

--height 0 captures the full page. Prints the page's JavaScript errors, if any, and exits 1 when plotly
did not render every figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1300)
    parser.add_argument("--height", type=int, default=0, help="viewport height; 0 = the full page")
    args = parser.parse_args()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height or 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(args.report.resolve().as_uri())
        page.wait_for_timeout(1500)
        figures = page.locator("div.plotly-graph-div").count()
        rendered = page.locator("div.plotly-graph-div .main-svg").count()
        page.screenshot(path=str(args.png), full_page=args.height == 0)
        browser.close()
    print(f"{figures} figures, {rendered} plotly svg layers; JavaScript errors: {errors or 'none'}")
    return 0 if figures and rendered >= figures and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
