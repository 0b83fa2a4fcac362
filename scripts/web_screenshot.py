"""Regenerate docs/web_page.png: the web backend's page after it captioned a held-out scene.

    python scripts/web_screenshot.py OUT        # OUT: a `convert blip --backend web` output
"""

from __future__ import annotations

import sys
import urllib.parse
from pathlib import Path

from plugins.backends.web.browser import CHECK_PREFIX, SiteBrowser, find_executable
from plugins.blip import fixture
from plugins.blip.web import validation_image

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(out: Path) -> None:
    name, content, _ = validation_image(0)
    scene = fixture.heldout_scenes(1)[0]
    texts = [scene.caption, *scene.distractors()[:3]]
    link = "index.html?" + urllib.parse.urlencode([("image", CHECK_PREFIX + name), *(("text", t) for t in texts),
                                                   ("beams", "3")])
    DOCS.mkdir(exist_ok=True)
    browser = SiteBrowser(out / "web", find_executable("chromium"), find_executable("node"), timeout_s=120)
    [page] = browser.open([link], {name: content}, screenshots={link: DOCS / "web_page.png"})
    if page.status != "done":
        raise SystemExit(f"the page did not finish: {page.error or page.results}")
    print(f"{DOCS / 'web_page.png'}: {page.results['results'][0]['captions'][0]['text']!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
