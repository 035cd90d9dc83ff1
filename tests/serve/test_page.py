"""The page at / in a real browser: the system Chromium driven by playwright (``make test-browser``).

Skipped, with the reason, when playwright or a Chromium binary is missing. The screenshot is saved in
the test's tmp dir and, when ``ELISE_BROWSER_OUT`` names a folder, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from testkit import tone

pytestmark = pytest.mark.browser

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    path = os.environ.get("ELISE_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUMS)), None)
    if not path:
        pytest.skip("no Chromium found: `apt install chromium` (or set ELISE_CHROMIUM=<binary>)")
    return path


def test_page_speaks_a_sentence_and_uploads_a_voice(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    url, _ = served
    clip = tmp_path / "clip.wav"
    sf.write(clip, tone(1.5, sr=16_000), 16_000)
    sentence = 'She said, "Hello, world," and smiled, then left.'
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#voice option').length > 0")
            page.fill("#text", sentence)
            page.fill("#seed", "4")
            page.click("#play")
            page.wait_for_function("document.getElementById('audio').duration > 0", timeout=60_000)
            duration = page.evaluate("document.getElementById('audio').duration")
            assert 1.0 < duration < 1.2  # one piece, cut at max_audio_seconds=1.0 (13 frames)
            assert "RTF" in page.inner_text("#stats") and "error" not in page.inner_text("#stats")

            page.fill("#vname", "page_voice")
            page.set_input_files("#vfile", str(clip))
            page.fill("#vtext", "A steady tone.")
            page.click("#upload")
            page.wait_for_function(
                "[...document.querySelectorAll('#voice option')].some(o => o.value === 'page_voice')"
            )
            assert page.input_value("#voice") == "page_voice"
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    if os.environ.get("ELISE_BROWSER_OUT"):
        out = Path(os.environ["ELISE_BROWSER_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)


def test_page_plays_a_conversation_with_its_timeline(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    url, _ = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#script", "0: Hello there.\n1: Hi, how are you?")
            page.fill("#dseed", "5")
            page.fill("#doverlap", "200")
            page.click("#talk")
            page.wait_for_function("document.getElementById('daudio').duration > 0", timeout=60_000)
            duration = page.evaluate("document.getElementById('daudio').duration")
            assert abs(duration - 1.88) < 0.01  # two 13-frame turns, 200 ms overlapped
            assert page.locator("#timeline tr").count() == 3  # the header and one row a turn
            assert page.inner_text("#dstats").startswith("2 turns")
            shot = tmp_path / "serve-page-dialogue.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    if os.environ.get("ELISE_BROWSER_OUT"):
        out = Path(os.environ["ELISE_BROWSER_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)
