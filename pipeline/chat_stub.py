"""A loopback OpenAI-compatible chat server for tests and benchmarks (no model behind it).

It answers every chat completion with `caption` after `latency_s`, and misbehaves on request when
the prompt contains a marker: FLAKY (429 on its first request), LONG (finish_reason "length"),
NOCHOICES (a reply without choices), NOTJSON (a body that is not JSON), EMPTYBODY (200 with no
body), HTTP500 (a server error, every time), HANG (no answer for `hang_s`), DRIP (headers, then a
byte every half second), CLOSE (the connection closed without an answer). `GET /v1/models`
lists one model. In a thread (tests: `requests_seen` records the bodies)
or in its own process (benchmarks: the server does not share the client's GIL).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CAPTION = "Two dogs and a car."


def _text_of(body: dict[str, Any]) -> str:
    return " ".join(
        part.get("text", "")
        for m in body.get("messages", [])
        for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}])
    )


class _Handler(BaseHTTPRequestHandler):
    server: StubChatServer

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server hook
        if self.path.rstrip("/").endswith("/models"):
            self._send(
                200,
                json.dumps(
                    {
                        "object": "list",
                        "data": [{"id": "stub", "object": "model", "created": 0, "owned_by": "denseforge"}],
                    }
                ).encode(),
            )
        else:
            self._send(404, b"{}")

    def do_POST(self) -> None:  # noqa: N802 - http.server hook
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stub = self.server
        with stub.lock:
            stub.requests_seen.append(body)
            text = _text_of(body)
            first_flaky = "FLAKY" in text and sum("FLAKY" in _text_of(r) for r in stub.requests_seen) == 1
        time.sleep(stub.latency_s)
        if first_flaky:
            return self._send(429, b"")
        if "HTTP500" in text:
            return self._send(500, b'{"error": {"message": "internal error"}}')
        if "HANG" in text:
            time.sleep(stub.hang_s)
            return self._send(504, b"")
        if "CLOSE" in text:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if "DRIP" in text:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(int(stub.hang_s * 2)):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.5)
            return None
        if "NOTJSON" in text:
            return self._send(200, b"<html>502 Bad Gateway</html>")
        if "EMPTYBODY" in text:
            return self._send(200, b"")
        reply: dict[str, Any] = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"] + "-served",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length" if "LONG" in text else "stop",
                    "message": {"role": "assistant", "content": stub.caption},
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16},
        }
        if "NOCHOICES" in text:
            del reply["choices"]
        self._send(200, json.dumps(reply).encode())


class StubChatServer(ThreadingHTTPServer):
    """`with StubChatServer() as url:` serves on 127.0.0.1 until the block ends."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, caption: str = CAPTION, latency_s: float = 0.0, own_process: bool = False, hang_s: float = 30.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.caption, self.latency_s, self.own_process, self.hang_s = caption, latency_s, own_process, hang_s
        self.requests_seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (timed out, closed) is part of the game, not an error to print."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> str:  # type: ignore[override]  # the URL to call, as tests use it
        self.runner: Any
        if self.own_process:
            import multiprocessing

            self.runner = multiprocessing.get_context("fork").Process(target=self.serve_forever, daemon=True)
        else:
            self.runner = threading.Thread(target=self.serve_forever, daemon=True)
        self.runner.start()
        return self.url

    def __exit__(self, *exc) -> None:
        if self.own_process:
            self.runner.terminate()
        else:
            self.shutdown()
        self.runner.join(timeout=5)
        self.server_close()
