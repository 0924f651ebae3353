"""Test set-up: offline switches before anything imports a model library; shared fixtures."""

from __future__ import annotations

import os
import tempfile

_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
    "YOLO_CONFIG_DIR": tempfile.mkdtemp(prefix="denseforge-yolo-"),
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_AUTH_MODE": "disabled",
}
for _k, _v in _OFFLINE.items():
    os.environ.setdefault(_k, _v)

import io  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from denseforge.pipeline.demo import LoopbackImageServer, load_photo  # noqa: E402
from denseforge.stages.sample import Sample  # noqa: E402


def blank_sample(**fields) -> Sample:
    """A sample with placeholder identity (key "k", 100 × 100, sha256 "0") and the given fields."""
    return Sample(**({"key": "k", "width": 100, "height": 100, "sha256": "0"} | fields))


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
    proc = subprocess.run(
        [sys.executable, "-m", "denseforge.pipeline.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"denseforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def config_file(tmp: Path, name: str = "c.yaml", **sections) -> Path:
    """A run config from its sections (`ray={"num_cpus": 2}`, `input=...`), written as YAML."""
    path = tmp / name
    path.write_text(yaml.safe_dump(sections))
    return path


def every_phase_config(tmp: Path, table, name: str = "c.yaml", **ray: float) -> Path:
    """Default ingest threads, several units, every phase on cheap models: ingest, embed, dedup,
    perceive, fuse, write. `table` is a local path or a URL; `ray` adds ray.* settings."""
    settings = ", ".join(f"{k}: {v}" for k, v in {"num_cpus": 2, **ray}.items())
    cfg = tmp / name
    cfg.write_text(f"""
ray: {{{settings}}}
input: {{path: {table}}}
ingest: {{processes: 2, image_size: 128, allow_private_addresses: true}}
embed: {{model: df-tiny-clip, weights: random, batch_size: 4}}
dedup: {{epsilon: null, clusters: 3, keep: first_key}}
perceive:
  enabled: true
  experts: [{{plugin: clip-tags, name: tagger, options: {{model: df-tiny-clip, weights: random, top_k: 2,
              threshold: 0.0}}, resources: {{num_cpus: 0.5, batch_size: 2}}}}]
fuse: {{enabled: true, backend: template}}
qa: {{enabled: true, min_words: 1}}
output: {{samples_per_shard: 2}}
""")
    return cfg


def run_result(out) -> dict:
    """What must be identical between two runs of one input: manifest, shard bytes, rejects,
    dedup decisions (a local folder or a store URL)."""
    from denseforge.storage import list_files, location, read_parquet

    out = location(out)
    return {
        "manifest": sorted(
            (r["key"], r["sha256"], r["shard"]) for r in read_parquet(out / "manifest.parquet").to_pylist()
        ),
        "shards": {p.name: p.read_bytes() for p in list_files(out / "shards", ".tar")},
        "rejects": sorted(
            (r["key"], r["stage"], r["reason"]) for r in read_parquet(out / "rejects.parquet").to_pylist()
        ),
        "decisions": read_parquet(out / "dedup" / "decisions.parquet").to_pylist(),
    }


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
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
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
