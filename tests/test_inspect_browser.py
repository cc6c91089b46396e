"""The generated dashboard in a real browser: headless Chromium driven over the DevTools protocol.

It opens index.html and latent.html from disk (file://, no server), checks that the index lists every latent, that
sorting and search work, that a latent page highlights the token the collection recorded, that neighbour links
navigate, and that the console logs no error; screenshots are saved. The protocol client is a few lines of stdlib
(a WebSocket over a socket), so the test needs no package beyond Debian's `chromium`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_inspect import make_checkpoint, model, run_inspect, train_config  # noqa: F401 (model: a fixture)

pytestmark = pytest.mark.browser

N_TOKENS = 4096


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is not installed; install it with: apt-get install -y chromium")


class WebSocket:
    """The client half of RFC 6455, enough for DevTools: masked text frames out, unmasked frames in."""

    def __init__(self, url: str, timeout: float = 30):
        match = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert b" 101 " in response.split(b"\r\n")[0], response

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 2**16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._exact(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._exact(8))[0]
            message += self._exact(length)
            if first & 0x80:  # FIN
                return message.decode()


class Browser:
    """One headless Chromium with one page; `call` sends a DevTools command, events are kept in `events`."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
                                      f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._port()
        deadline = time.time() + 30
        while True:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/json")
            pages = [t for t in json.loads(connection.getresponse().read()) if t["type"] == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.2)
        self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"])
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _port(self) -> int:
        deadline = time.time() + 30
        for line in self.proc.stderr:
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                return int(match.group(1))
            if time.time() > deadline:
                break
        raise RuntimeError("chromium did not start its DevTools server")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def js(self, expression: str):
        """The value of a JS expression (awaited if it is a promise); a JS exception fails the test."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def open(self, url: str, ready: str) -> None:
        """Navigate, then wait until the JS expression `ready` is true."""
        self.call("Page.navigate", url=url)
        self.wait(ready)

    def wait(self, condition: str, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.js(f"Boolean({condition})"):
                    return
            except AssertionError:  # the page is between documents
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {condition}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        self.js("1")  # drain pending events
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", "")[:300])
        return found

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("browser") / "topk", train_config())


@pytest.fixture(scope="module")
def site(tmp_path_factory, sae_run) -> Path:
    return run_inspect(sae_run, tmp_path_factory.mktemp("browser") / "site", "html", tokens=N_TOKENS, neighbours=5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


def index_data(site: Path) -> dict:
    return json.loads((site / "data/index.js").read_text().split("=", 1)[1].strip().rstrip(";"))


def row_ids(browser: Browser) -> list[int]:
    return browser.js("[...document.querySelectorAll('#latents tbody tr')].map(r => Number(r.dataset.id))")


def search(browser: Browser, text: str) -> None:
    """Type into the search box as a user would (the page listens to `input` events)."""
    browser.js(f"(() => {{ const box = document.getElementById('search'); box.value = {json.dumps(text)}; "
               f"box.dispatchEvent(new Event('input')); }})()")


def test_index_lists_sorts_and_searches(site, browser, tmp_path):
    index = index_data(site)["columns"]
    browser.open((site / "index.html").as_uri(), "document.querySelectorAll('#latents tbody tr').length > 0")
    assert row_ids(browser) == index["id"] == list(range(64))  # every latent, by id
    assert browser.js("document.querySelectorAll('#latents tbody tr.dead').length") == sum(index["dead"])
    assert browser.js("document.querySelectorAll('#density rect').length") > 0

    browser.js("document.querySelector('th[data-key=max]').click()")  # largest max activation first
    by_max = sorted(index["id"], key=lambda i: (-index["max"][i], i))
    assert row_ids(browser) == by_max
    browser.js("document.querySelector('th[data-key=max]').click()")  # again: ascending
    assert row_ids(browser) == sorted(index["id"], key=lambda i: (index["max"][i], i))
    browser.js("document.querySelector('th[data-key=log10_density]').click()")  # densest first, dead ones last
    alive = [i for i in index["id"] if index["log10_density"][i] is not None]
    dead = [i for i in index["id"] if index["log10_density"][i] is None]
    assert row_ids(browser) == sorted(alive, key=lambda i: (-index["log10_density"][i], i)) + dead

    token = next(t.split('"')[1] for t in index["top_tokens"] if t.strip('" ').strip())
    search(browser, token)
    matching = {i for i in index["id"] if token.lower() in index["top_tokens"][i].lower()}
    assert set(row_ids(browser)) == matching and matching
    search(browser, "17")
    assert row_ids(browser) == [17]
    search(browser, "")
    browser.screenshot(tmp_path / "index.png")
    assert (tmp_path / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert browser.errors() == []


def test_latent_page_highlights_the_recorded_token(site, sae_run, browser, model, tmp_path):  # noqa: F811
    from saekit.checkpoint import load_sae
    from saekit.inspect.features import token_strings
    from saekit.inspect.run import inspected_windows, latent_encoder

    index = index_data(site)["columns"]
    latent = max(index["id"], key=lambda i: index["max"][i] if not index["dead"][i] else -1)
    browser.open(f"{(site / 'latent.html').as_uri()}#{latent}", "document.querySelector('#top .ctx')")
    assert browser.js("document.getElementById('title').textContent") == f"Latent {latent}"
    first = browser.js("""(() => { const c = document.querySelector('#top .ctx'); const f = c.querySelector('.tok.focus');
        return {window: Number(c.dataset.window), position: Number(c.dataset.position), text: f.textContent,
                value: Number(f.dataset.value), lit: [...c.querySelectorAll('.tok')].filter(t => t.style.background).length};
        })()""")
    # Independently of the site's data: the latent's strongest (window, position) over the inspected tokens.
    sae, _ = load_sae(sae_run / "sae.safetensors")
    windows = inspected_windows(train_config().data, model, N_TOKENS)
    z = latent_encoder(model, sae, "blocks.2.hook_resid_post")(windows)[:, 1:, latent]  # the BOS position is not scored
    flat = int(torch.argmax(z))
    window, position = flat // z.shape[1], flat % z.shape[1] + 1
    assert (first["window"], first["position"]) == (window, position)
    vocab = token_strings(model.tokenizer, model.d_vocab)
    assert first["text"] == vocab[int(windows[window, position])]
    assert first["value"] == pytest.approx(float(z.max()), rel=1e-3)
    assert first["lit"] >= 1
    assert browser.js("document.querySelectorAll('#quantiles .ctx').length") > 0
    assert browser.js("document.querySelectorAll('#hist rect').length") > 0
    assert browser.js("document.querySelectorAll('#logits td').length") > 0
    browser.screenshot(tmp_path / "latent.png")
    assert (tmp_path / "latent.png").stat().st_size > 5000

    neighbour = browser.js("document.querySelector('a.neighbour').getAttribute('href')")
    target = int(neighbour.split("#")[1])
    browser.js("document.querySelector('a.neighbour').click()")
    browser.wait(f"document.getElementById('title').textContent === 'Latent {target}'")
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = cos @ cos[latent]
    cos[latent] = -2
    assert target == int(cos.argmax())
    assert browser.errors() == []
    np.testing.assert_equal(browser.js("location.protocol"), "file:")
