"""RunDir: paths and markers in one place, the run lock, unique temporary names."""

from __future__ import annotations

import os
import threading

import pytest

from denseforge.errors import RunDirError
from denseforge.pipeline.rundir import RunDir
from denseforge.storage import write_json_atomic


def test_a_second_driver_is_refused_while_the_first_holds_the_lock(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.locked("run"):
        holder = rd.holder()
        assert holder["pid"] == os.getpid() and holder["command"] == "run"
        with pytest.raises(RunDirError, match=rf"in use by a running driver .*\"pid\": {os.getpid()}"):
            with RunDir(tmp_path / "run").locked("resume"):
                pass
    assert rd.holder() is None
    with rd.locked("resume"):  # free again once the first driver is done
        pass


def test_the_lock_sweeps_temporary_files_a_killed_writer_left(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "shards").mkdir()
    stale = tmp_path / "shards" / ".0000001.tar.123-456-abcd.tmp"
    stale.write_bytes(b"half a tar")
    keep = tmp_path / "shards" / "0000001.tar"
    keep.write_bytes(b"done")
    with rd.locked("resume"):
        assert not stale.exists() and keep.exists()


def test_concurrent_writers_of_one_file_never_trip_over_each_others_temporary_names(tmp_path):
    target = tmp_path / "marker.json"
    errors = []

    def writer(n):
        try:
            for i in range(200):
                write_json_atomic(target, {"writer": n, "i": i})
        except OSError as exc:  # the old fixed name gave FileNotFoundError here
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not list(tmp_path.glob(".*.tmp"))


def test_pending_and_markers_are_per_phase(tmp_path):
    rd = RunDir(tmp_path)
    rd.raw.mkdir()
    write_json_atomic(rd.ingest_marker(1), {})
    assert rd.pending("ingest", 3) == [0, 2] and rd.pending("write", 2) == [0, 1]
    assert rd.markers("ingest") == [rd.ingest_marker(1)] and rd.markers("embed") == []
