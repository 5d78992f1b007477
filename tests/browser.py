"""Headless Chromium driven over the DevTools protocol (CDP), for the status page's browser tests.

Debian's ``chromium`` (CI installs it, see .ci/run) runs as root only with ``--no-sandbox``;
the other flags keep it off the network, which is closed anyway. CDP speaks JSON over a
websocket: aiohttp's client (the live extra) is all it takes, no driver download.
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import aiohttp

from conftest import wait_until

#: Where Debian puts it (``chromium``); other distributions name it differently.
BINARY = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
               if shutil.which(name)), None)

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1100",
         "--remote-debugging-port=0", "--remote-allow-origins=*")


class Chromium:
    """One headless Chromium on a fresh profile under ``root``, killed with its whole group by :meth:`close`."""

    def __init__(self, root: Path):
        self.profile = root / "chromium-profile"
        self.log = root / "chromium.log"
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    def start(self, url: str) -> "Chromium":
        self.profile.mkdir(parents=True)
        self.process = subprocess.Popen([BINARY, *FLAGS, f"--user-data-dir={self.profile}", url],
                                        stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                        start_new_session=True)  # its own group: close() kills every helper
        active = self.profile / "DevToolsActivePort"
        assert wait_until(lambda: active.exists() and active.read_text().strip(), timeout=60), self.log.read_text()
        self.port = int(active.read_text().split()[0])
        return self

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=60)

    async def page(self, session: aiohttp.ClientSession) -> "Page":
        """The tab Chromium opened on the start URL."""
        async with session.get(f"http://127.0.0.1:{self.port}/json/list") as response:
            targets = await response.json()
        [tab] = [target for target in targets if target["type"] == "page"]
        return Page(await session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0))


class Page:
    """One tab: evaluate JavaScript, navigate, take a screenshot."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse):
        self.socket = socket
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict:
        self._next += 1
        await self.socket.send_json({"id": self._next, "method": method, "params": params})
        while True:  # events arrive in between; the reply carries our id
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == self._next:
                assert "error" not in message, message
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def text(self, selector: str) -> str:
        return await self.evaluate(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    async def wait_for_text(self, selector: str, *needles: str, timeout: float = 60.0) -> str:
        """Poll ``selector``'s text until it holds every needle (the page updates itself)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            text = await self.text(selector)
            if all(needle in text for needle in needles):
                return text
            assert asyncio.get_running_loop().time() < deadline, f"{selector} never showed {needles}: {text!r}"
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        import base64

        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
