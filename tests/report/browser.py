"""Open a local HTML file in a real headless Chromium and report what a reader's browser saw.

The check drives Debian's ``chromium`` through the Chrome DevTools Protocol over
``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors 3 and 4): no port, no
websocket package, no browser download. Each page gets a fresh browser context (no cache, no
cookies shared with the page before) in one browser process that is started once and reused.

What is reported of a page:

* ``console_errors``: uncaught JS exceptions (``Runtime.exceptionThrown``), ``console.error``
  and ``console.assert`` calls, the browser's own error log (``Log.entryAdded``: "Failed to load
  resource: net::ERR_FILE_NOT_FOUND" for a missing file beside the page, CSP and mixed-content
  errors) and JS dialogs (``alert()``: noted and dismissed, so they cannot block the page).
* ``images``: every ``<img>``'s ``src`` (data URIs shortened), ``naturalWidth``/``naturalHeight``
  and ``complete`` once every image has had its chance to load and decode (``loading=lazy``
  ones are made eager first); ``naturalWidth`` 0 is a broken image (missing file, corrupt
  data URI: the latter is in no console message).
* ``network_requests``: every http(s)/ws(s)/ftp URL the page tried to reach. None gets out:
  the DevTools ``Fetch`` domain pauses each http(s) request and fails it (``BlockedByClient``),
  and the browser as a whole resolves no host name (``--host-resolver-rules``) and sends what is
  left to a proxy that is not there (``--proxy-server=127.0.0.1:9``), its own background
  traffic included.

A hung page or browser never hangs the caller: every wait is bounded by ``timeout``; past it
``BrowserTimeout`` is raised and the browser process group is killed (the shared browser is
started afresh on the next call).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VIEWPORT = (1280, 800)
NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "install Debian's package: apt-get update && apt-get install -y chromium "
    "(.ci/run installs it before the tests)"
)

FLAGS = (
    "--headless=new",
    # Root in a container: Chromium's sandbox needs user namespaces that CI may not have.
    "--no-sandbox",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-extensions",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
    "--metrics-recording-only",
    "--mute-audio",
    "--password-store=basic",
    "--use-mock-keychain",
    # WebGL (e.g. plotly's scattergl) in software, as on a machine without a GPU.
    "--enable-unsafe-swiftshader",
    # No network: no host name resolves, and whatever is left goes to a proxy that isn't there.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=127.0.0.1:9",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    "--force-device-scale-factor=1",
    "--lang=en-US",
)

# Give every image its chance: lazy ones load now, each decodes (or fails), fonts are in, and
# two frames are painted before anything is measured or captured.
SETTLE_JS = """(async () => {
  const imgs = Array.from(document.images);
  for (const img of imgs) { if (img.loading === 'lazy') img.loading = 'eager'; }
  await Promise.all(imgs.map((img) => img.decode().catch(() => null)));
  if (document.fonts) { await document.fonts.ready; }
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  return true;
})()"""

IMAGES_JS = """Array.from(document.images).map((img) => ({
  src: img.getAttribute('src') || img.currentSrc || '',
  natural_width: img.naturalWidth,
  natural_height: img.naturalHeight,
  complete: img.complete,
}))"""


class BrowserError(RuntimeError):
    """The browser could not be started, crashed, or answered a command with an error."""


class BrowserTimeout(BrowserError, TimeoutError):
    """The browser did not answer in time (it is killed)."""


@dataclass
class PageReport:
    """What the browser saw of one page."""

    console_errors: list[str]
    images: list[dict[str, Any]]
    network_requests: list[str]
    screenshot: Path | None
    title: str
    seconds: float = 0.0  # wall time of open_in_browser for this page (browser start excluded)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """Images that did not load or decode (``naturalWidth`` 0 or not ``complete``)."""
        return [img for img in self.images if not img["complete"] or img["natural_width"] == 0]

    def problems(self) -> list[str]:
        """Every finding that a self-contained report must not have, one line each."""
        return (
            [f"console error: {text}" for text in self.console_errors]
            + [f"broken image: {img['src']}" for img in self.broken_images]
            + [f"network request: {url}" for url in self.network_requests]
        )


def chromium_path() -> str | None:
    """The Chromium (or Chrome) executable: ``$CHROMIUM`` if set, else the first on ``PATH``."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return shutil.which(configured)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Chromium's path; a test failure under ``CI=true`` when it is missing, a skip elsewhere."""
    path = chromium_path()
    if path is None:
        where = f"$CHROMIUM={os.environ['CHROMIUM']}" if os.environ.get("CHROMIUM") else "on PATH"
        message = f"chromium not found ({where}): {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def artifacts_dir(*parts: str) -> Path:
    """A folder for test artifacts: ``$TEST_ARTIFACTS`` or ``.tmp/test-artifacts/`` (git-ignored)."""
    base = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / ".tmp" / "test-artifacts")
    folder = base.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _executable(path: str) -> str:
    """Debian's ``/usr/bin/chromium`` is a shell launcher that loads extensions: skip it."""
    real = Path("/usr/lib/chromium/chromium")
    if Path(path).resolve() == Path("/usr/bin/chromium") and os.access(real, os.X_OK):
        return str(real)
    return path


def shorten(src: str, limit: int = 120) -> str:
    """A data URI as its head and length; anything else cut in the middle past ``limit``."""
    if src.startswith("data:") and len(src) > limit:
        head = src.split(",", 1)[0]
        return f"{head},{src[len(head) + 1 : len(head) + 17]}…[{len(src)} chars]"
    if len(src) > limit:
        return f"{src[: limit // 2]}…{src[-limit // 2 :]}"
    return src


class _Pipe:
    """CDP over a pair of pipes: commands out, NUL-terminated JSON messages in."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self.write_fd, data) :]
        except OSError as err:
            raise BrowserError(f"browser closed its pipe while sending {method}: {err}") from err
        return self.next_id

    def receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserTimeout(f"no answer from the browser in time ({waiting_for})")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser exited ({waiting_for})")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def close(self) -> None:
        for fd in (self.write_fd, self.read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _child_fds(command_read: int, answer_write: int) -> Callable[[], None]:
    """In the child: the command pipe's end on fd 3, the answer pipe's on fd 4 (CDP's pipe)."""

    def setup() -> None:
        os.dup2(command_read, 100)
        os.dup2(answer_write, 101)
        os.dup2(100, 3)
        os.dup2(101, 4)
        os.close(100)
        os.close(101)

    return setup


class Browser:
    """One headless Chromium process; ``open`` loads a page in a fresh context and reports it."""

    def __init__(self, executable: str | None = None, start_timeout: float = 30) -> None:
        path = executable or chromium_path()
        if path is None:
            raise BrowserError(f"chromium not found: {INSTALL_HINT}")
        self.profile = Path(tempfile.mkdtemp(prefix="report-browser-"))
        self.log_path = self.profile / "chromium.log"
        command_read, command_write = os.pipe()
        answer_read, answer_write = os.pipe()
        argv = [_executable(path), *FLAGS, f"--user-data-dir={self.profile / 'profile'}"]
        try:
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [*argv, "about:blank"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=False,  # keeps fds 3 and 4 (made by preexec_fn); Python's are private
                    preexec_fn=_child_fds(command_read, answer_write),
                    start_new_session=True,  # its own process group: close() ends every helper
                )
        except OSError:
            for fd in (command_read, command_write, answer_read, answer_write):
                os.close(fd)
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        os.close(command_read)
        os.close(answer_write)
        self.pipe = _Pipe(command_write, answer_read)
        # Events are handled as they arrive, even in the middle of a command (a paused request
        # must be answered before the page can go on).
        self.listener: Callable[[dict[str, Any]], None] | None = None
        try:
            self.version = self.call(
                "Browser.getVersion", deadline=time.monotonic() + start_timeout
            )
        except BrowserError as err:
            log_tail = self.log_tail()
            self.kill()
            raise BrowserError(f"chromium did not start: {err}\n{log_tail}") from err

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str = "",
        *,
        deadline: float,
    ) -> dict[str, Any]:
        """Send one command and wait for its answer; events on the way go to ``listener``."""
        wanted = self.pipe.send(method, params, session)
        while True:
            message = self.pipe.receive(deadline, method)
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.dispatch(message)

    def pump(self, deadline: float, waiting_for: str) -> None:
        """Wait for the next message (by ``deadline``) and hand it to ``listener``."""
        self.dispatch(self.pipe.receive(deadline, waiting_for))

    def dispatch(self, message: dict[str, Any]) -> None:
        if "method" in message and self.listener is not None:
            self.listener(message)

    def open(self, html: Path, screenshot: Path | None = None, timeout: float = 60) -> PageReport:
        """Load ``html`` (a local file), let it settle, and report what the browser saw."""
        html = Path(html).resolve()
        if not html.is_file():
            raise FileNotFoundError(html)
        started = time.monotonic()
        page = _Page(self, deadline=started + timeout)
        try:
            return page.run(html, screenshot, started)
        except BrowserError:
            page.abandoned = True  # the browser is in an unknown state: open_in_browser kills it
            raise
        finally:
            page.dispose()

    def close(self) -> None:
        """Ask the browser to quit; kill its process group if it has not within 5 seconds."""
        if self.alive:
            with contextlib.suppress(BrowserError):
                self.pipe.send("Browser.close")
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # helpers left behind by a crash
            os.killpg(self.process.pid, signal.SIGKILL)
        self.pipe.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class _Page:
    """One page in its own browser context, and what it has reported so far."""

    browser: Browser
    deadline: float
    session: str = ""
    context: str = ""
    target: str = ""
    errors: list[str] = field(default_factory=list)
    network: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    abandoned: bool = False

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, deadline=self.deadline)

    def browser_call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.browser.call(method, params, deadline=self.deadline)

    def open_target(self) -> None:
        """A fresh context and tab, attached, with the domains that report enabled."""
        self.browser.listener = self.handle
        self.context = self.browser_call("Target.createBrowserContext", {})["browserContextId"]
        self.target = self.browser_call(
            "Target.createTarget", {"url": "about:blank", "browserContextId": self.context}
        )["targetId"]
        self.session = self.browser_call(
            "Target.attachToTarget", {"targetId": self.target, "flatten": True}
        )["sessionId"]
        patterns = [{"urlPattern": f"{scheme}//*"} for scheme in ("http:", "https:")]
        self.call("Fetch.enable", {"patterns": patterns})
        for domain in ("Network", "Runtime", "Log", "Page", "Inspector"):
            self.call(f"{domain}.enable")
        width, height = VIEWPORT
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def run(self, html: Path, screenshot: Path | None, started: float) -> PageReport:
        self.open_target()
        navigated = self.call("Page.navigate", {"url": html.as_uri()})
        if navigated.get("errorText"):
            self.errors.append(f"navigation failed: {navigated['errorText']}")
        else:
            self.wait_for("Page.loadEventFired")
        self.evaluate(SETTLE_JS, await_promise=True)
        self.drain(quiet=0.1)  # late console messages and failed loads
        images = [{**img, "src": shorten(img["src"])} for img in self.evaluate(IMAGES_JS) or []]
        title = self.evaluate("document.title") or ""
        shot = self.capture(screenshot) if screenshot is not None else None
        return PageReport(
            console_errors=list(self.errors),
            images=images,
            network_requests=list(self.network),
            screenshot=shot,
            title=title,
            seconds=round(time.monotonic() - started, 3),
        )

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        params = {"expression": expression, "returnByValue": True, "awaitPromise": await_promise}
        answer = self.call("Runtime.evaluate", params)
        if "exceptionDetails" in answer:
            raise BrowserError(f"the report's own script failed: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def capture(self, path: Path) -> Path:
        shot = self.call("Page.captureScreenshot", {"format": "png"})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def wait_for(self, method: str) -> None:
        while method not in self.seen:
            self.browser.pump(self.deadline, f"waiting for {method}")

    def drain(self, quiet: float) -> None:
        """Handle the events that come until none has for ``quiet`` seconds."""
        while True:
            try:
                self.browser.pump(min(time.monotonic() + quiet, self.deadline), "settling")
            except BrowserTimeout:
                if time.monotonic() >= self.deadline:
                    raise
                return

    def handle(self, event: dict[str, Any]) -> None:
        """Record one event of this page; answer its paused requests at once."""
        method: str = event["method"]
        params: dict[str, Any] = event.get("params", {})
        if event.get("sessionId") != self.session:
            if method == "Target.detachedFromTarget" and params.get("sessionId") == self.session:
                raise BrowserError("the page went away (its renderer crashed or was closed)")
            return
        if method == "Inspector.targetCrashed":
            raise BrowserError("the page's renderer crashed")
        self.seen.add(method)
        handler = _HANDLERS.get(method)
        if handler is not None:
            handler(self, params)

    def note_request(self, url: str) -> None:
        if url.startswith(NETWORK_SCHEMES) and url not in self.network:
            self.network.append(url)

    def dispose(self) -> None:
        """Close the tab and its context (unless the browser is to be killed anyway)."""
        self.browser.listener = None
        if self.abandoned or not self.browser.alive:
            return
        self.deadline = time.monotonic() + 10
        with contextlib.suppress(BrowserError):
            if self.target:
                self.browser_call("Target.closeTarget", {"targetId": self.target})
            if self.context:
                self.browser_call(
                    "Target.disposeBrowserContext", {"browserContextId": self.context}
                )


def _on_exception(page: _Page, params: dict[str, Any]) -> None:
    details = params["exceptionDetails"]
    exception = details.get("exception") or {}
    text = (exception.get("description") or details.get("text") or "").splitlines()[0:1]
    where = f"{details.get('url') or ''}:{details.get('lineNumber', 0) + 1}"
    page.errors.append(f"{details.get('text', 'Uncaught')} {' '.join(text)} ({where})".strip())


def _on_console(page: _Page, params: dict[str, Any]) -> None:
    if params.get("type") not in ("error", "assert"):
        return
    parts = [
        str(arg.get("value", arg.get("description", arg.get("type", ""))))
        for arg in params.get("args", [])
    ]
    page.errors.append(f"console.{params['type']}: {' '.join(parts)}")


def _on_log(page: _Page, params: dict[str, Any]) -> None:
    entry = params["entry"]
    if entry.get("level") == "error":
        url = f" ({shorten(entry['url'])})" if entry.get("url") else ""
        page.errors.append(f"{entry.get('text', '')}{url}")


def _on_request(page: _Page, params: dict[str, Any]) -> None:
    page.note_request(params["request"]["url"])


def _on_paused(page: _Page, params: dict[str, Any]) -> None:
    page.note_request(params["request"]["url"])
    page.browser.pipe.send(
        "Fetch.failRequest",
        {"requestId": params["requestId"], "errorReason": "BlockedByClient"},
        page.session,
    )


def _on_websocket(page: _Page, params: dict[str, Any]) -> None:
    page.note_request(params["url"])


def _on_dialog(page: _Page, params: dict[str, Any]) -> None:
    """``alert()`` and friends would block the page: note them and dismiss them."""
    page.errors.append(f"javascript dialog ({params.get('type')}): {params.get('message', '')}")
    page.browser.pipe.send("Page.handleJavaScriptDialog", {"accept": True}, page.session)


_HANDLERS: dict[str, Callable[[_Page, dict[str, Any]], None]] = {
    "Runtime.exceptionThrown": _on_exception,
    "Runtime.consoleAPICalled": _on_console,
    "Log.entryAdded": _on_log,
    "Network.requestWillBeSent": _on_request,
    "Network.webSocketCreated": _on_websocket,
    "Fetch.requestPaused": _on_paused,
    "Page.javascriptDialogOpening": _on_dialog,
}

_shared: Browser | None = None


def shared_browser() -> Browser:
    """The process-wide browser, started on first use (again after a crash or timeout)."""
    global _shared
    if _shared is None or not _shared.alive:
        _shared = Browser()
        atexit.register(_shared.close)
    return _shared


def open_in_browser(
    html: Path,
    screenshot: Path | None = None,
    timeout: float = 60,
    *,
    browser: Browser | None = None,
) -> PageReport:
    """Open ``html`` in headless Chromium (the shared browser unless one is given) and report.

    ``screenshot``: where to write a PNG of the first screen (1280x800). ``timeout`` bounds the
    whole page (load, settle, screenshot); past it ``BrowserTimeout`` is raised and the browser
    is killed, so the next call starts a fresh one.
    """
    used = browser or shared_browser()
    try:
        return used.open(html, screenshot, timeout)
    except BrowserError:
        used.kill()
        raise
