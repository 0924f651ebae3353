"""A run makes no outbound request of its own: Ray's usage stats and cloud probes stay off."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ..conftest import run_cli

pytestmark = pytest.mark.slow


class _Proxy(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _record(self):
        self.server.seen.append(f"{self.command} {self.path}")
        self.send_error(502)

    do_GET = do_POST = do_PUT = do_CONNECT = _record


def test_a_run_sends_nothing_through_the_proxy(tmp_path, photo_dir, monkeypatch):
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    proxy.seen = []
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, url)
    for var in ("no_proxy", "NO_PROXY", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{kind: folder, path: {folder}}}\nray: {{num_cpus: 2}}\n"
        "embed: {enabled: false}\ndedup: {enabled: false}\n"
    )
    try:
        run_cli("run", str(cfg), "--out", str(tmp_path / "run"))
    finally:
        proxy.shutdown()
    assert proxy.seen == [], f"requests through the proxy: {proxy.seen}"
    assert os.environ["http_proxy"] == url  # the test really had the proxy set
