"""Storage: every file a run reads or writes, on local disk or in an object store, through fsspec.

A path is a `UPath` (universal_pathlib, fsspec's pathlib): `location("s3://bucket/run")` or a local
path alike. A local one is a real `pathlib.Path` (its writes keep today's speed and semantics); a
remote one carries its storage options to every path derived from it, so a Ray task that receives
it reads and writes the same store with the same settings.

Completion on an object store: there is no atomic rename, but a single PUT (or a multipart upload)
makes an object appear whole or not at all. `writing()` writes under a temporary name and renames
on local disk, and on a store uploads directly and aborts the upload if the writer fails; readers
trust only completion markers, which are written last.

Credentials come from each filesystem's standard chain (`AWS_*`, profiles, `AWS_ENDPOINT_URL`,
`GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_*`, ...) plus the `storage.options` of the config,
whose values may be `${ENV_VAR}` references; a literal secret there is refused, so none is ever
written to the run's files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from denseforge.errors import ConfigError, StorageError

LOCAL_PROTOCOLS = ("", "file", "local")
SECRET_KEY = re.compile(r"secret|password|token|credential|account_key|sas|connection_string|^key$", re.I)
ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
SCRATCH_ENV = "DENSEFORGE_SCRATCH"
# A file larger than this goes up in parts of this size (S3's minimum is 5 MiB): what a writer
# holds in memory, whatever the size of the shard.
UPLOAD_PART = 8 * 2**20


def check_options(options: dict[str, Any]) -> None:
    """Refuse a literal secret in `storage.options`: it would be saved in the run's config.yaml."""
    for key, value in _walk(options):
        if SECRET_KEY.search(key) and isinstance(value, str) and not ENV_REF.match(value):
            raise ConfigError(
                f"storage.options.{key}: a secret is never written into a config; give it as "
                f"${{ENV_VAR}} or through the store's standard credentials (AWS_*, profiles, "
                "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)"
            )


def _walk(options: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _resolve(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, str) and (ref := ENV_REF.match(value)):
        if ref.group(1) not in os.environ:
            raise ConfigError(f"storage.options refers to ${{{ref.group(1)}}}, which is not set in the environment")
        return os.environ[ref.group(1)]
    return value


class _RetryCounter(logging.Handler):
    """Counts the store requests this process retried (botocore's throttling and connection
    retries, s3fs's own backoff on SlowDown and dropped reads), read off their debug records."""

    NEEDLES = (
        "Retry needed, action of",
        "Retry needed, retrying request",
        "Retryable error",
        "Client error (maybe retryable)",
    )

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(self.NEEDLES):
            self.count += 1


_RETRIES = _RetryCounter()
# in every process that touches a store
for _name in ("s3fs", "botocore.retryhandler", "botocore.retries.standard"):
    logging.getLogger(_name).addHandler(_RETRIES)
    logging.getLogger(_name).setLevel(logging.DEBUG)
    logging.getLogger(_name).propagate = False  # counted here, not printed


def store_retries() -> int:
    """Store requests this process retried since the last call (a unit's writer reports them with
    the unit's counts)."""
    count, _RETRIES.count = _RETRIES.count, 0
    return count


def location(path: str | os.PathLike[str] | UPath, options: dict[str, Any] | None = None) -> UPath:
    """A path in any store: a URL (`s3://`, `gs://`, `az://`, `abfs://`, `memory://`, ...) with its
    storage options, or a local path made absolute."""
    if isinstance(path, UPath) and not options:
        return path
    text = str(path)
    if "://" not in text or text.startswith("file://"):
        return UPath(os.path.abspath(os.path.expanduser(text.removeprefix("file://"))))
    protocol = text.split("://", 1)[0]
    # no listings cache: other processes write here, and a cached listing made fsspec report a
    # file another worker had just written as missing
    settings = {"use_listings_cache": False, **_resolve(options or {})}
    try:
        return UPath(text, **settings)
    except (ValueError, ImportError) as exc:
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}.get(
            protocol
        )
        extra = f"; install it with `pip install {hint}`" if hint else ""
        raise StorageError(f"{text}: no filesystem for {protocol}:// ({exc}){extra}") from None


def _store(path: UPath | Path) -> tuple[Any, str]:
    """The fsspec filesystem of a store path and the path as that filesystem names it."""
    upath = path if isinstance(path, UPath) else location(path)
    return upath.fs, upath.path


def is_local(path: UPath | Path) -> bool:
    return getattr(path, "protocol", "") in LOCAL_PROTOCOLS


def url(path: UPath | Path) -> str:
    """The path as a user types it (no storage options: those may hold secrets)."""
    return str(path) if is_local(path) else path.as_uri() if hasattr(path, "as_uri") else str(path)


def ensure_dir(path: UPath | Path) -> None:
    """A folder on local disk; nothing on an object store, where folders are key prefixes (and a
    `mkdir` of a missing bucket would create the bucket)."""
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)


def scratch_dir(configured: str | None = None) -> Path:
    """This node's scratch folder for temporaries (`DENSEFORGE_SCRATCH`, else `storage.scratch`,
    else the system's temp dir); never a place other nodes or a later run read from."""
    root = Path(os.environ.get(SCRATCH_ENV) or configured or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return root


def tmp_path(path: Path) -> Path:
    """A temporary name beside a local `path` that no other writer (process or thread) uses; it
    starts with a dot and ends in `.tmp`, so no glob of finished files matches it and the run's lock
    holder can sweep the ones a killed writer left."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def writing(path: UPath | Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` whole when the block ends, or not at all if it raises:
    a rename on local disk, a (multipart) upload on an object store, aborted on failure."""
    if is_local(path):
        tmp = tmp_path(Path(str(path)))
        tmp.parent.mkdir(parents=True, exist_ok=True)  # as on a store, where a key needs no folder
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, str(path))
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, key = _store(path)
    handle = fs.open(key, "wb", block_size=UPLOAD_PART)
    try:
        yield handle
    except BaseException:
        discard = getattr(handle, "discard", None)
        if discard is not None:  # s3fs, gcsfs: abort the multipart upload, nothing appears
            discard()
            handle.closed = True  # nothing left to flush when it is collected
        else:
            handle.close()
            fs.rm(key)
        raise
    handle.close()


def write_bytes(path: UPath | Path, data: bytes) -> None:
    with writing(path) as handle:
        handle.write(data)


def write_json_atomic(path: UPath | Path, payload: Any) -> None:
    write_bytes(path, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())


def read_bytes(path: UPath | Path) -> bytes:
    """A whole file: one GET on an object store (a UPath's own read asks for the size first)."""
    if is_local(path):
        return Path(str(path)).read_bytes()
    fs, key = _store(path)
    return fs.cat_file(key)


def read_json(path: UPath | Path) -> Any:
    """A JSON file the run wrote; a truncated or foreign one is one line naming it."""
    return _json(path, read_bytes(path))


def read_json_many(paths: list[UPath]) -> list[Any]:
    """Many small JSON files (a phase's markers), in order: on an object store fetched
    concurrently in one batch, not one request after another."""
    if not paths or is_local(paths[0]):
        return [read_json(p) for p in paths]
    found = paths[0].fs.cat([p.path for p in paths])
    return [_json(p, found[p.path]) for p in paths]


def _json(path: UPath | Path, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(
            f"{url(path)} is not valid JSON ({exc}; {len(data)} bytes): it was cut short or is not "
            "denseforge's. Restore it; a unit's completion marker (raw/, embeddings/, shards/_done/) or "
            "stats.json may be deleted instead, and `denseforge resume` redoes what it recorded"
        ) from None


def write_table_atomic(path: UPath | Path, table: pa.Table, **options: Any) -> None:
    """A parquet file, whole or not at all; `options` go to `pq.write_table`."""
    with writing(path) as handle:
        pq.write_table(table, handle, **options)


def write_arrow_atomic(path: UPath | Path, table: pa.Table) -> int:
    """An Arrow IPC file (uncompressed): for files the run writes and reads back itself, ~40x
    cheaper than parquet for vector columns and readable memory-mapped (`read_arrow`). Returns
    its size in bytes."""
    with writing(path) as handle:
        with pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)
        return handle.tell()


def read_arrow(path: UPath | Path) -> pa.Table:
    """An Arrow IPC file: memory-mapped on local disk (columns read from the page cache as they are
    used), fetched whole from an object store."""
    if is_local(path):
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    return pa.ipc.open_file(pa.BufferReader(read_bytes(path))).read_all()


def write_parquet_atomic(path: UPath | Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    write_table_atomic(path, pa.Table.from_pylist(rows, schema=schema))


def _arrow_args(path: UPath | Path) -> tuple[str, Any]:
    if is_local(path):
        return str(path), None
    fs, key = _store(path)
    return key, fs


def read_parquet(path: UPath | Path, **options: Any) -> pa.Table:
    """A parquet file; `options` go to `pq.read_table` (columns, filters, schema). From an object
    store: with `filters`, only the row groups they need (ranged reads); without, the whole file
    in one request."""
    where, fs = _arrow_args(path)
    if fs is not None and options.get("filters") is None:
        return pq.read_table(pa.BufferReader(read_bytes(path)), **options)
    return pq.read_table(where, filesystem=fs, **options)


@contextmanager
def parquet_writer(path: UPath | Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A streaming parquet writer whose file appears whole when the block ends."""
    with writing(path) as handle, pq.ParquetWriter(handle, schema) as writer:
        yield writer


def remove(path: UPath | Path) -> None:
    """A file, if it is there."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_tree(path: UPath | Path) -> None:
    """A folder (a key prefix) and everything under it, if it is there."""
    if is_local(path):
        shutil.rmtree(str(path), ignore_errors=True)
        return
    fs, key = _store(path)
    try:
        fs.rm(key, recursive=True)
    except FileNotFoundError:
        pass


def copy_tree(source: UPath | Path, target: UPath | Path, skip: tuple[str, ...] = ()) -> int:
    """Copy the finished files under `source` to `target` (hard links where both are on one local
    disk; no folder whose name is in `skip`); returns how many. The source is only read."""
    copied = 0
    children: list[UPath | Path] = sorted(source.iterdir(), key=lambda p: p.name) if source.exists() else []
    for path in children:
        if path.name.startswith(".") or path.name in skip:
            continue
        if path.is_dir():
            copied += copy_tree(path, target / path.name, skip)
            continue
        if is_local(path) and is_local(target):
            Path(str(target)).mkdir(parents=True, exist_ok=True)
            try:
                os.link(str(path), str(target / path.name))
            except OSError:  # another disk, or links not allowed: a copy
                shutil.copyfile(str(path), str(target / path.name))
        else:
            write_bytes(target / path.name, read_bytes(path))
        copied += 1
    return copied


def append_text(path: UPath | Path, text: str) -> None:
    """Add to a small text file (a log): in place on local disk; rewritten whole on an object
    store, which has no append."""
    if is_local(path):
        ensure_dir(path.parent)
        with open(str(path), "a", encoding="utf-8") as handle:
            handle.write(text)
        return
    try:
        before = read_bytes(path)
    except FileNotFoundError:
        before = b""
    write_bytes(path, before + text.encode("utf-8"))


@contextmanager
def staged(folder: UPath | Path, scratch: str | None = None) -> Iterator[Path]:
    """A local folder whose files end up in `folder`: `folder` itself on local disk; on an object
    store a scratch folder of this node, uploaded file by file (streamed) when the block ends and
    removed either way. For writers that only know local files (img2dataset's)."""
    if is_local(folder):
        ensure_dir(folder)
        yield Path(str(folder))
        return
    fs, key = _store(folder)
    local = Path(tempfile.mkdtemp(prefix="denseforge-", dir=scratch_dir(scratch)))
    try:
        yield local
        for file in sorted(local.iterdir()):
            if file.is_file():
                fs.put_file(str(file), f"{key}/{file.name}")
    finally:
        shutil.rmtree(local, ignore_errors=True)


def publish(local: Path, target: UPath | Path) -> None:
    """A finished local file becomes `target`: renamed on local disk, uploaded (streamed) to an
    object store and removed here."""
    if is_local(target):
        Path(str(target)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, str(target))
        return
    fs, key = _store(target)
    fs.put_file(str(local), key)
    local.unlink(missing_ok=True)


def open_binary(path: UPath | Path) -> IO[bytes]:
    """A seekable binary reader (ranged reads on an object store)."""
    if is_local(path):
        return open(str(path), "rb")
    fs, key = _store(path)
    return fs.open(key, "rb")


def read_text_file(path: UPath | Path) -> io.TextIOWrapper:
    """A text reader over `open_binary` that replaces bad UTF-8."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline="")


def child(where: UPath, fs_path: str) -> UPath:
    """The path of `fs_path` (as the filesystem lists it: `bucket/key`) in the store of `where`,
    with its storage options."""
    return UPath(f"{where.protocol}://{fs_path}", **where.storage_options)


def describe_store_error(exc: BaseException) -> str:
    """One line for why a store refused: a missing bucket, wrong credentials, no answer."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    for needles, cause in (
        (("nosuchbucket", "bucket does not exist", "specified bucket"), "the bucket does not exist"),
        (
            (
                "invalidaccesskeyid",
                "signaturedoesnotmatch",
                "accessdenied",
                "access denied",
                "forbidden",
                "403",
                "permissionerror",
                "nocredentials",
                "unable to locate credentials",
            ),
            "access denied: check the credentials (AWS_* / profile / storage.options)",
        ),
        (
            (
                "could not connect",
                "connect timeout",
                "endpointconnectionerror",
                "connection refused",
                "name or service not known",
                "cannot connect",
            ),
            "the store does not answer (check AWS_ENDPOINT_URL / the network)",
        ),
    ):
        if any(n in lowered for n in needles):
            return f"{cause} ({text[:200]})"
    return text[:300]


def check_store(path: UPath, purpose: str) -> None:
    """Reach the store of `path` once, before any work: its bucket exists and the credentials may
    list it. Raises StorageError with the URL and the cause."""
    if is_local(path):
        return
    bucket = path.path.split("/", 1)[0]
    try:
        path.fs.ls(bucket, detail=False, refresh=True)
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise StorageError(f"{purpose} {url(path)}: {describe_store_error(exc)}") from None


def modified_times(folder: UPath | Path) -> dict[str, float]:
    """Name -> modification time (epoch seconds) of the files in `folder`, from one listing (a
    store lists them with their times; no request per file)."""
    try:
        if is_local(folder):
            with os.scandir(str(folder)) as entries:
                return {e.name: e.stat().st_mtime for e in entries if e.is_file()}
        fs, key = _store(folder)
        found = fs.ls(key, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    times = {}
    for info in found:
        stamp = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
        if hasattr(stamp, "timestamp"):
            times[info["name"].rsplit("/", 1)[-1]] = stamp.timestamp()
        elif isinstance(stamp, (int, float)):
            times[info["name"].rsplit("/", 1)[-1]] = float(stamp)
    return times


def list_files(folder: UPath | Path, suffix: str) -> list[UPath]:
    """The finished files of `folder` whose names end in `suffix`, sorted by name (one listing,
    paginated on an object store); none when the folder is not there."""
    try:
        found = [location(p) for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found, key=lambda p: p.name)
