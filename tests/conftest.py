"""Test set-up: offline switches before anything imports a model library; shared fixtures."""

from __future__ import annotations

import os
import tempfile

_OFFLINE = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False",
    "YOLO_CONFIG_DIR": tempfile.mkdtemp(prefix="denseforge-yolo-"), "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_AUTH_MODE": "disabled",
}
for _k, _v in _OFFLINE.items():
    os.environ.setdefault(_k, _v)

import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from denseforge.pipeline.demo import LoopbackImageServer, load_photo  # noqa: E402


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", **kwargs)
    return out.getvalue()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real photos (scikit-image) plus the files a crawl meets: HTML, truncated JPEG."""
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(load_photo(name), quality=90))
    good = (root / "coffee.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "page.jpg").write_bytes(b"<!doctype html><html><body>nope</body></html>")
    return root


@pytest.fixture(scope="session")
def photo_server(photo_dir):
    with LoopbackImageServer(photo_dir) as server:
        yield server


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `denseforge` CLI in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "denseforge.pipeline.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"denseforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


PLUGIN = Path(__file__).resolve().parent / "plugins" / "denseforge-colors"


@pytest.fixture(scope="session")
def colors_plugin(tmp_path_factory):
    """The example plugin package (an expert and a stage), pip-installed for the session."""
    import shutil

    source = tmp_path_factory.mktemp("plugin") / PLUGIN.name  # build outside the source tree
    shutil.copytree(PLUGIN, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(source)], check=True, timeout=300)
    yield
    subprocess.run(pip + ["uninstall", "-y", "denseforge-colors"], check=True, timeout=300)


S3_BUCKET = "denseforge-test"
S3_SECRET = "denseforge-test-secret-5f3a9"  # never to be found in a file of a run


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto's server mode) with one bucket; the standard
    AWS_* variables point this process, and the CLI and Ray processes it starts, at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    yield f"http://{host}:{port}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket_url(s3_server, request) -> str:
    """An empty prefix of the test bucket, unique to the test."""
    import uuid

    return f"s3://{S3_BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
