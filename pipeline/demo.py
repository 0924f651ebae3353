"""The offline demo corpus and the loopback HTTP server that serves it.

Real photographs ship with scikit-image; the demo turns them into a small LAION-style table with
odd-but-valid variants (EXIF-rotated, transparent, palette, 16-bit, grayscale, CMYK, animated,
WebP) and, optionally, the failures a web crawl meets: a dead link, a 500, an HTML page behind an
image URL, a truncated JPEG and rows with unusable URLs. The same server backs the integration
tests and `denseforge bench ingest`.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont
from upath import UPath

from denseforge.storage import write_table_atomic

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera")


def load_photo(name: str) -> Image.Image:
    """A real photograph bundled with scikit-image, as a Pillow image."""
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def odd_variants(img: Image.Image) -> dict[str, bytes]:
    """Valid images in awkward encodings, each of which must come out upright 8-bit RGB."""
    rgb = img.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated_store = rgb.transpose(Image.Transpose.ROTATE_90)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgb.size, 128))
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "exif_rotated.jpg": _encode(rotated_store, "JPEG", exif=exif.tobytes()),
        "alpha.png": _encode(rgba, "PNG"),
        "palette.gif": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        "gray16.png": _encode(gray16, "PNG"),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "photo.webp": _encode(rgb, "WEBP"),
    }


@dataclass
class DemoCorpus:
    table: UPath | None
    rows: int
    images: int


def build_demo_corpus(
    files: Path, table: UPath | None, base_url: str, copies: int = 2, include_broken: bool = True
) -> DemoCorpus:
    """Write the demo images (the web the loopback server serves) under the local folder `files`
    and, when `table` is given, the input table there (a run's `demo/input.parquet`, in its store).
    Deterministic: a resume on another machine serves the same bytes again."""
    files.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index, name in enumerate(PHOTOS):
        photo = load_photo(name).convert("RGB")
        for copy in range(copies):
            # each copy is a different crop, so they are distinct photographs of the same scene
            w, h = photo.size
            inset = copy * min(w, h) // 10
            crop = photo.crop((inset, inset // 2, w - inset // 2, h - inset))
            filename = f"{name}_{copy}.jpg"
            (files / filename).write_bytes(_encode(crop, "JPEG", quality=92))
            rows.append(
                {
                    "url": f"{base_url}/img/{filename}",
                    "caption": f"{name.replace('_', ' ')} photo, view {copy}",
                    "source_id": f"{name}-{copy}",
                    "license": "scikit-image sample data",
                }
            )
        if index == 1:  # a landscape photo, so a missed EXIF rotation shows
            for variant, data in odd_variants(photo.resize((w // 2, h // 2))).items():
                filename = f"{name}_{variant}"
                (files / filename).write_bytes(data)
                rows.append(
                    {
                        "url": f"{base_url}/img/{filename}",
                        "caption": f"{name} stored as {variant}",
                        "source_id": f"{name}-{variant}",
                        "license": "scikit-image sample data",
                    }
                )
    # planted duplicates: a byte-identical copy under another URL, and an 85 % re-encode
    original = files / f"{PHOTOS[2]}_0.jpg"
    (files / "copy_of_chelsea.jpg").write_bytes(original.read_bytes())
    smaller: Image.Image = Image.open(original)
    smaller = smaller.resize((round(smaller.width * 0.85), round(smaller.height * 0.85)))
    (files / "resized_chelsea.jpg").write_bytes(_encode(smaller, "JPEG", quality=80))
    rows += [
        {"url": f"{base_url}/img/{name}", "caption": why, "source_id": name, "license": "scikit-image sample data"}
        for name, why in (("copy_of_chelsea.jpg", "an exact copy"), ("resized_chelsea.jpg", "an 85% re-encode"))
    ]
    # a sign with text, so the OCR expert has something real to read
    sign = Image.new("RGB", (640, 240), (250, 250, 240))
    draw = ImageDraw.Draw(sign)
    draw.text((40, 50), "DENSEFORGE", fill=(20, 20, 120), font=ImageFont.load_default(size=64))
    draw.text((40, 150), "Open 24 hours", fill=(120, 20, 20), font=ImageFont.load_default(size=40))
    sign.save(files / "sign.png")
    rows.append(
        {"url": f"{base_url}/img/sign.png", "caption": "a shop sign", "source_id": "sign", "license": "generated"}
    )
    images = len(rows)
    if include_broken:
        good = (files / f"{PHOTOS[1]}_0.jpg").read_bytes()
        (files / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (files / "page.jpg").write_bytes(b"<!doctype html><html><body>Not an image</body></html>")
        broken = [
            (f"{base_url}/img/does_not_exist.jpg", "a dead link"),
            (f"{base_url}/status/500", "a server error"),
            (f"{base_url}/img/page.jpg", "HTML behind an image URL"),
            (f"{base_url}/img/truncated.jpg", "a truncated JPEG"),
            ("ftp://example.com/image.jpg", "an unsupported scheme"),
            ("", "an empty URL"),
        ]
        rows += [
            {"url": url, "caption": why, "source_id": f"broken-{i}", "license": None}
            for i, (url, why) in enumerate(broken)
        ]
    if table is not None:
        write_table_atomic(table, pa.Table.from_pylist(rows))
    return DemoCorpus(table, len(rows), images)


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackImageServer._Server

    def log_message(self, *args) -> None:  # keep test and demo output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server hook
        parts = urlsplit(self.path)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        query = parse_qs(parts.query)
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        if segments[:1] == ["img"] and len(segments) == 2:
            target = (self.server.root / segments[1]).resolve()
            if target.parent == self.server.root and target.is_file():
                body = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        elif segments[:1] == ["status"] and len(segments) == 2 and segments[1].isdigit():
            self.send_error(int(segments[1]))
            return
        elif segments[:1] == ["drip"]:  # a slow server: `bytes` at a time every `every` s, no length
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            step, every = int(query.get("bytes", ["12"])[0]), float(query.get("every", ["0.2"])[0])
            try:
                for _ in range(int(query.get("times", ["100"])[0])):
                    self.wfile.write(b"\xff" * step)
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:  # the client gave up
                pass
            return
        elif segments[:1] == ["redirect"] and "to" in query:
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_error(404)


class LoopbackImageServer:
    """Serve a folder over HTTP on 127.0.0.1 in a background thread (a context manager).

    Routes: /img/NAME (a file of the folder), /status/CODE (that HTTP error), /redirect?to=URL.
    """

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024
        root: Path
        delay_s: float

    def __init__(self, root: Path, port: int = 0, delay_s: float = 0.0):
        self._server = self._Server(("127.0.0.1", port), _Handler)
        self._server.root = Path(root).resolve()
        self._server.delay_s = delay_s
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-images", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
