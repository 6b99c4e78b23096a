"""The headless-browser check itself, on small pages written for each test.

Each page proves one thing the check must see: a good page is clean (and its screenshot shows
what was drawn), a broken image reads ``naturalWidth`` 0, a JS error is a console error, and a
request to the network is recorded and never leaves the machine.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from . import browser as browser_module
from .browser import (
    VIEWPORT,
    Browser,
    BrowserError,
    BrowserTimeout,
    artifacts_dir,
    open_in_browser,
    require_chromium,
    shared_browser,
    shorten,
)

SWATCH = (31, 119, 180)  # the good page's top-left block, looked for in its screenshot


def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(size, color)).decode()


def page(folder: Path, name: str, body: str, title: str = "Test page") -> Path:
    path = folder / name
    path.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>'
        f'<body style="margin:0">{body}</body></html>',
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def chromium() -> Browser:
    """The shared browser, started once for the session (a failure in CI when missing)."""
    require_chromium()
    return shared_browser()


@pytest.fixture
def loopback_server() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server (127.0.0.1 only) and the paths it was asked for."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_good_page_is_clean_and_its_screenshot_shows_it(chromium: Browser, tmp_path: Path) -> None:
    (tmp_path / "beside.png").write_bytes(png_bytes((5, 2), (0, 128, 0)))
    html = page(
        tmp_path,
        "good.html",
        f'<div style="width:300px;height:200px;background:rgb{SWATCH}"></div>'
        f'<img alt="inline" src="{data_uri((4, 3), (200, 30, 30))}">'
        '<img alt="beside" src="beside.png">'
        "<script>document.title = document.title + ' (scripted)';</script>",
        title="Good report",
    )
    shot = artifacts_dir("browser") / "good.png"
    shot.unlink(missing_ok=True)

    report = open_in_browser(html, screenshot=shot, timeout=30)

    assert report.console_errors == []
    assert report.network_requests == []
    assert report.problems() == []
    assert report.title == "Good report (scripted)"
    inline, beside = report.images
    assert inline["src"].startswith("data:image/png;base64,") and "chars]" in inline["src"]
    assert (inline["natural_width"], inline["natural_height"], inline["complete"]) == (4, 3, True)
    assert (beside["src"], beside["natural_width"], beside["complete"]) == ("beside.png", 5, True)
    assert report.screenshot == shot
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as image:
        assert image.size == VIEWPORT
        assert image.convert("RGB").getpixel((50, 50)) == SWATCH
        assert image.convert("RGB").getpixel((VIEWPORT[0] // 2, VIEWPORT[1] - 50)) == (
            255,
            255,
            255,
        )


def test_broken_images_read_natural_width_zero(chromium: Browser, tmp_path: Path) -> None:
    html = page(
        tmp_path,
        "broken.html",
        f'<img src="{data_uri((2, 2), (0, 0, 255))}">'
        '<img src="missing.png">'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB">',  # cut short
    )

    report = open_in_browser(html, timeout=30)

    widths = [(img["src"][:22], img["natural_width"]) for img in report.images]
    assert widths == [
        ("data:image/png;base64,", 2),
        ("missing.png", 0),
        ("data:image/png;base64,", 0),
    ]
    assert [img["src"] for img in report.broken_images] == [
        "missing.png",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB",
    ]
    # The missing file is also a failed load in the console; a corrupt data URI is not.
    assert len(report.console_errors) == 1
    assert "ERR_FILE_NOT_FOUND" in report.console_errors[0]
    assert "missing.png" in report.console_errors[0]
    assert report.network_requests == []


def test_js_errors_are_console_errors(chromium: Browser, tmp_path: Path) -> None:
    html = page(
        tmp_path,
        "js-error.html",
        "<script>drawPlot();</script>"
        "<script>console.error('plot data missing:', 3); console.log('fine');</script>"
        "<script>setTimeout(() => { throw new TypeError('late failure'); }, 30);</script>"
        "<script>alert('would block the page');</script>",
    )

    report = open_in_browser(html, timeout=30)

    assert len(report.console_errors) == 4, report.console_errors
    uncaught, logged, dialog, late = report.console_errors
    assert dialog == "javascript dialog (alert): would block the page"
    assert "ReferenceError: drawPlot is not defined" in uncaught
    assert "js-error.html" in uncaught
    assert logged == "console.error: plot data missing: 3"
    assert "TypeError: late failure" in late
    assert report.network_requests == []


def test_network_requests_are_recorded_and_blocked(
    chromium: Browser, tmp_path: Path, loopback_server: tuple[str, list[str]]
) -> None:
    local, hits = loopback_server
    html = page(
        tmp_path,
        "network.html",
        '<script src="https://cdn.example.com/x.js"></script>'
        f'<img src="{local}/pixel.png">'
        f"<script>fetch('{local}/data.json').catch(() => null);"
        "document.title = typeof window.fromCdn;</script>",
    )

    report = open_in_browser(html, timeout=30)

    assert report.network_requests == [
        "https://cdn.example.com/x.js",
        f"{local}/pixel.png",
        f"{local}/data.json",
    ]
    assert hits == []  # blocked in the browser: nothing reached even a server on this machine
    assert report.title == "undefined"  # the CDN script never ran
    assert report.images[0]["natural_width"] == 0
    assert any("cdn.example.com/x.js" in e and "BLOCKED" in e for e in report.console_errors)
    assert len(report.problems()) == len(report.console_errors) + 1 + 3


def test_a_hung_page_times_out_and_the_browser_is_killed(chromium: Browser, tmp_path: Path) -> None:
    html = page(tmp_path, "hang.html", "<script>while (true) {}</script>")
    own = Browser()
    started = time.monotonic()

    with pytest.raises(BrowserTimeout, match="in time"):
        open_in_browser(html, timeout=2, browser=own)

    assert time.monotonic() - started < 15
    assert not own.alive
    # The shared browser is untouched and still answers.
    assert open_in_browser(page(tmp_path, "after.html", "ok"), timeout=30).console_errors == []


def test_a_browser_that_does_not_start_is_an_error(chromium: Browser) -> None:
    with pytest.raises(BrowserError, match="chromium did not start"):
        Browser(executable="/bin/false", start_timeout=10)


def test_missing_html_file_is_an_error(chromium: Browser, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_in_browser(tmp_path / "nope.html")


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_module, "chromium_path", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium.*\.ci/run"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_chromium()


def test_shorten_keeps_data_uris_readable() -> None:
    uri = "data:image/png;base64," + "A" * 5000
    assert shorten(uri) == f"data:image/png;base64,{'A' * 16}…[{len(uri)} chars]"
    assert shorten("plots/loss.png") == "plots/loss.png"
    assert len(shorten("x" * 1000)) == 121
