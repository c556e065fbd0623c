"""The report as a person sees it: rendered by a real headless browser (Debian's
``chromium``; ``make test`` installs it when missing) from the file alone, with no network.
The screenshot must show the page with its pictures drawn — the lines of the training
curves and the criterion — not a blank page or the browser's error page."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from lstmkit.app import report
from lstmkit.app.train import TrainConfig, train

WIDTH, HEIGHT = 1200, 2600
#: matplotlib's first line colour (the run's curve) and the criterion line's (both anti-aliased on screen)
TAB_BLUE, TAB_GREEN = (31, 119, 180), (44, 160, 44)


def _browser() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no chromium on PATH: `make test` installs Debian's chromium (apt-get install chromium)")


def _screenshot(html: Path, out: Path, profile: Path) -> np.ndarray:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
           f"--screenshot={out}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    img = matplotlib.image.imread(io.BytesIO(out.read_bytes()), format="png")
    return (img[..., :3] * 255).round().astype(np.int16)


def _pixels(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 30) -> int:
    return int((np.abs(img - np.array(rgb)).max(-1) <= tol).sum())


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    cfg = TrainConfig(task="adding", task_options={"length": 22, "eval_size": 16}, hidden_size=6, batch_size=4,
                      steps=6, eval_every=2, eval_batch_size=16)
    train(cfg, root / "run", progress=False)
    return report.write_report(root / "run", gradflow=False)


def _shows_pictures(img: np.ndarray) -> bool:
    """The embedded PNGs are decoded and drawn: the curve and the criterion line of the
    training-curves picture are on screen (an error page or a broken image has neither)."""
    return _pixels(img, TAB_BLUE) > 200 and _pixels(img, TAB_GREEN) > 100


def test_the_report_renders_in_a_headless_browser(page, tmp_path):
    img = _screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    assert img.shape == (HEIGHT, WIDTH, 3)
    white = (img >= 250).all(-1).mean()
    assert 0.3 < white < 0.97, white  # a page with content, neither blank nor all ink
    assert _shows_pictures(img)
    # the heading is drawn as text at the top left (dark pixels), the contents below it
    assert (img[:80, :600] < 80).all(-1).sum() > 300


def test_the_picture_check_fails_on_the_report_without_its_pictures(page, tmp_path):
    """The checks above can fail: the same report with its embedded images emptied renders
    its text (the browser ran and drew the page) but none of the pictures."""
    html = page.read_text(encoding="utf-8")
    stripped, n = re.subn(r'src="data:image/png;base64,[^"]*"', 'src=""', html)
    assert n >= 1, "the report embeds no PNG: the test below would prove nothing"
    bare = tmp_path / "bare.html"
    bare.write_text(stripped, encoding="utf-8")
    img = _screenshot(bare, tmp_path / "shot.png", tmp_path / "profile")
    assert (img[:80, :600] < 80).all(-1).sum() > 300  # the heading is there: a real page
    assert not _shows_pictures(img)
