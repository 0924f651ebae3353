"""The storage layer on local disk and on a real S3-compatible server (moto on loopback): whole
files or none, markers listed in order, the object-store lease lock, one-line errors, no secrets."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow as pa
import pytest

from denseforge import storage
from denseforge.errors import ConfigError, InputError, Interrupted, NodeLostError, RunDirError, StorageError
from denseforge.pipeline import rundir as rundir_module
from denseforge.pipeline.config import dump_config, parse_config
from denseforge.pipeline.rundir import RunDir
from denseforge.stages.read_input import expand_paths

from ..conftest import S3_BUCKET, run_cli


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return storage.location(tmp_path / "store")
    return storage.location(request.getfixturevalue("bucket_url"))


def test_json_parquet_and_arrow_files_round_trip(root):
    storage.write_json_atomic(root / "a" / "x.json", {"n": 1})
    table = pa.table({"key": ["b", "a"], "v": [1, 2]})
    storage.write_table_atomic(root / "a" / "t.parquet", table)
    storage.write_arrow_atomic(root / "a" / "t.arrow", table)
    assert storage.read_json(root / "a" / "x.json") == {"n": 1}
    assert storage.read_parquet(root / "a" / "t.parquet").equals(table)
    assert storage.read_parquet(root / "a" / "t.parquet", filters=[("key", "=", "a")]).column("v").to_pylist() == [2]
    assert storage.read_arrow(root / "a" / "t.arrow").equals(table)
    assert [p.name for p in storage.list_files(root / "a", ".json")] == ["x.json"]
    assert storage.list_files(root / "nothing-here", ".json") == []
    storage.append_text(root / "logs" / "driver.log", "one\n")
    storage.append_text(root / "logs" / "driver.log", "two\n")
    assert (root / "logs" / "driver.log").read_text() == "one\ntwo\n"
    storage.remove_tree(root / "a")
    assert storage.list_files(root / "a", ".json") == []


def test_a_writer_that_fails_leaves_no_file(root):
    target = root / "shard.tar"
    with pytest.raises(RuntimeError):
        with storage.writing(target) as handle:
            handle.write(b"x" * 10_000)
            raise RuntimeError("the worker died mid-file")
    assert not target.exists()
    assert storage.list_files(root, "") == []  # no temporary either


def test_markers_are_listed_in_unit_order_with_one_listing(root):
    rd = RunDir(root)
    for unit in (3, 0, 12):
        storage.write_json_atomic(rd.write_marker(unit), {"unit": unit})
    assert [p.name for p in rd.markers("write")] == ["0000000.json", "0000003.json", "0000012.json"]
    assert rd.pending("write", 5) == [1, 2, 4]


def test_the_object_store_lock_refuses_a_second_driver_and_expires(bucket_url, monkeypatch):
    rd = RunDir(storage.location(bucket_url))
    with rd.locked("run"):
        assert rd.holder()["command"] == "run"
        with pytest.raises(RunDirError, match="in use by a running driver"):
            with rd.locked("resume"):
                pass
    assert rd.holder() is None and not rd.lock_file.exists()
    # a driver killed while it held the lease: its lease stops being renewed and then expires
    storage.write_json_atomic(
        rd.lock_file,
        {
            "host": "h",
            "pid": 1,
            "command": "run",
            "token": "dead",
            "renewed": time.time() - rundir_module.LEASE_EXPIRY_S - 1,
        },
    )
    assert rd.holder() is None
    with rd.locked("resume"):
        assert rd.holder()["command"] == "resume"


def test_the_lease_is_renewed_while_the_driver_works(bucket_url, monkeypatch):
    monkeypatch.setattr(rundir_module, "LEASE_RENEW_S", 0.05)
    rd = RunDir(storage.location(bucket_url))
    with rd.locked("run"):
        first = storage.read_json(rd.lock_file)["renewed"]
        deadline = time.monotonic() + 20
        while storage.read_json(rd.lock_file)["renewed"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage.read_json(rd.lock_file)["renewed"] > first


def test_a_missing_bucket_is_one_line_naming_the_url(s3_server):
    with pytest.raises(StorageError, match=r"--out s3://no-such-bucket-here/run: the bucket does not exist"):
        storage.check_store(storage.location("s3://no-such-bucket-here/run"), "--out")


@pytest.mark.parametrize(
    "message, cause",
    [
        (
            "ClientError: An error occurred (InvalidAccessKeyId) when calling the ListObjectsV2 operation",
            "access denied",
        ),
        ("PermissionError: Forbidden", "access denied"),
        ("EndpointConnectionError: Could not connect to the endpoint URL", "does not answer"),
        ("FileNotFoundError: The specified bucket does not exist", "bucket does not exist"),
    ],
)
def test_store_errors_say_the_cause(message, cause):
    assert cause in storage.describe_store_error(RuntimeError(message))


def test_an_input_prefix_without_tables_is_an_input_error(bucket_url):
    storage.write_json_atomic(storage.location(bucket_url) / "notes.json", {})
    with pytest.raises(InputError, match="holds no files ending in"):
        expand_paths(bucket_url, {".parquet"})
    storage.write_table_atomic(storage.location(bucket_url) / "b.parquet", pa.table({"url": ["x"]}))
    storage.write_table_atomic(storage.location(bucket_url) / "a.parquet", pa.table({"url": ["y"]}))
    assert [p.name for p in expand_paths(bucket_url, {".parquet"})] == ["a.parquet", "b.parquet"]
    assert [p.name for p in expand_paths(bucket_url + "/*.parquet", {".parquet"})] == ["a.parquet", "b.parquet"]
    with pytest.raises(InputError, match="does not exist"):
        expand_paths(bucket_url + "/missing.parquet", {".parquet"})


def test_a_literal_secret_in_storage_options_is_refused_and_a_reference_is_kept(monkeypatch):
    with pytest.raises(ConfigError, match="storage.options.secret: a secret is never written"):
        storage.check_options({"secret": "hunter2"})
    with pytest.raises(ConfigError, match="client_kwargs.aws_secret_access_key"):
        parse_config(
            {
                "demo": {"enabled": True},
                "ingest": {"allow_private_addresses": True},
                "storage": {"options": {"client_kwargs": {"aws_secret_access_key": "hunter2"}}},
            }
        )
    config = parse_config(
        {
            "demo": {"enabled": True},
            "ingest": {"allow_private_addresses": True},
            "storage": {"options": {"secret": "${DF_TEST_SECRET}", "endpoint_url": "http://x"}},
        }
    )
    monkeypatch.setenv("DF_TEST_SECRET", "hunter2")
    assert "hunter2" not in dump_config(config) and "${DF_TEST_SECRET}" in dump_config(config)
    assert storage.location("s3://b/k", config.storage.options).storage_options["secret"] == "hunter2"
    monkeypatch.delenv("DF_TEST_SECRET")
    with pytest.raises(ConfigError, match="DF_TEST_SECRET"):
        storage.location("s3://b/k", config.storage.options)


def test_the_cli_refuses_a_missing_bucket_and_an_unreachable_cluster_before_creating_anything(s3_server, tmp_path):
    start = time.monotonic()
    missing = run_cli("run", "demo", "--out", "s3://no-such-bucket-here/run", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "denseforge: error: --out s3://no-such-bucket-here/run: the bucket does not exist "
        "(FileNotFoundError: The specified bucket does not exist)"
    ]
    out = tmp_path / "never"
    nowhere = run_cli("run", "demo", "--out", str(out), "--address", "127.0.0.1:1", check=False)
    assert nowhere.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in nowhere.stderr
    assert not out.exists()
    assert time.monotonic() - start < 60
    table = run_cli(
        "run",
        "demo",
        "--out",
        f"s3://{S3_BUCKET}/x",
        "--set",
        "demo.enabled=false",
        "--set",
        f"input.path=s3://{S3_BUCKET}/no/tables/here",
        check=False,
    )
    assert table.returncode == 2 and f"input.path 's3://{S3_BUCKET}/no/tables/here' does not exist" in table.stderr


def test_sigterm_raises_interrupted_with_exit_code_143():
    from denseforge.pipeline.ray_session import stop_cleanly_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_cleanly_on_signals()
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert caught.value.exit_code == 143
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class _Progress:
    def __init__(self):
        self.last_update = time.monotonic()
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@pytest.fixture
def two_nodes(monkeypatch):
    """Two fake Ray nodes the watch sees (drop one to lose it); SIGUSR1's handler restored after."""
    from denseforge.pipeline import ray_session

    nodes = {"a" * 40: "10.0.0.1 (aaaaaaaa)", "b" * 40: "10.0.0.2 (bbbbbbbb)"}
    monkeypatch.setattr(ray_session, "alive_nodes", lambda: dict(nodes))
    saved = signal.getsignal(signal.SIGUSR1)
    yield nodes
    signal.signal(signal.SIGUSR1, saved)


def test_a_lost_node_without_progress_interrupts_the_driver_naming_the_node(two_nodes):
    from denseforge.pipeline.ray_session import NodeWatch

    progress = _Progress()
    with pytest.raises(NodeLostError, match=r"Ray node 10.0.0.2 \(bbbbbbbb\) was lost and the run made no progress"):
        with NodeWatch(0.3, progress, every_s=0.05):
            two_nodes.pop("b" * 40)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert progress.warnings == ["Ray node 10.0.0.2 (bbbbbbbb) was lost; its work is retried on the other nodes"]


def test_a_lost_node_while_units_keep_finishing_does_not_stop_the_run(two_nodes):
    from denseforge.pipeline.ray_session import NodeWatch

    progress = _Progress()
    with NodeWatch(0.3, progress, every_s=0.05) as watch:
        two_nodes.pop("b" * 40)
        for _ in range(40):  # a unit finishes every 50 ms: Ray's retries are doing their job
            progress.last_update = time.monotonic()
            time.sleep(0.05)
    assert watch.reason is None and watch.lost


def test_node_work_is_counted_per_stage_and_node():
    from denseforge.pipeline.accounting import count_traces, merge_counts

    traces = [
        json.dumps({"yolo": {"s": 0.5, "n": "n1"}}),
        json.dumps({"yolo": {"s": 0.25, "n": "n2"}}),
        json.dumps({"yolo": {"s": 0.25, "n": "n1", "f": "ValueError", "m": "bad"}}),
    ]
    counts = count_traces(traces)
    assert counts["yolo"]["nodes"] == {"n1": {"items": 2, "busy_s": 0.75}, "n2": {"items": 1, "busy_s": 0.25}}
    total: dict = {}
    merge_counts(total, counts)
    merge_counts(total, counts)
    assert total["yolo"]["nodes"]["n1"] == {"items": 4, "busy_s": 1.5}


def test_threads_do_not_see_a_half_written_object(bucket_url):
    target = storage.location(bucket_url) / "big.bin"
    seen: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(target.exists() and target.stat().st_size not in (0, 12 * 2**20))

    thread = threading.Thread(target=watch)
    thread.start()
    with storage.writing(target) as handle:
        for _ in range(12):
            handle.write(os.urandom(2**20))
    stop.set()
    thread.join()
    assert target.stat().st_size == 12 * 2**20 and not any(seen)


def test_a_truncated_json_file_is_one_line_naming_it(root):
    from denseforge.storage import write_bytes

    write_bytes(root / "run.json", b'{"state": "runn')
    with pytest.raises(StorageError, match=r"run.json is not valid JSON .*15 bytes.*cut short"):
        storage.read_json(root / "run.json")
