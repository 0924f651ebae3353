import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from denseforge.errors import InputError
from denseforge.stages.read_input import iter_folder_rows, iter_table_rows, write_units


def _units(tmp_path, rows, spp=3, allow_private=False, allow_files=False):
    out = tmp_path / "units"
    plan = write_units(rows, out, spp, allow_private, allow_files)
    accepted = [pa.ipc.open_file(pa.memory_map(str(p))).read_all().to_pylist() for p in sorted(out.glob("*.arrow"))]
    rejects = [pq.read_table(p).to_pylist() for p in sorted(out.glob("*.screened.parquet"))]
    return plan, accepted, rejects


def test_laion_columns_and_extras_from_parquet(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": ["http://example.com/a.jpg", "https://example.com/b.png"],
                "TEXT": ["a cat", None],
                "similarity": [0.31, 0.28],
                "WIDTH": [640, 800],
            }
        ),
        path,
    )
    rows = list(iter_table_rows(str(path), "auto", "URL", "TEXT", None))
    assert [r.url for r in rows] == ["http://example.com/a.jpg", "https://example.com/b.png"]
    assert rows[0].caption == "a cat" and rows[1].caption is None
    assert rows[0].source == {"similarity": 0.31, "WIDTH": 640}
    kept = list(iter_table_rows(str(path), "parquet", "URL", "TEXT", ["WIDTH"]))
    assert kept[1].source == {"WIDTH": 800}


def test_missing_column_names_it_and_lists_what_exists(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"URL": ["http://x.org/a.jpg"]}), path)
    with pytest.raises(InputError, match=r"'url' not found .*the table has: URL"):
        list(iter_table_rows(str(path), "auto", "url", None, None))


def test_csv_with_malformed_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        'url,caption,extra\nhttp://e.com/1.jpg,"one, quoted",x\nhttp://e.com/2.jpg,only two\n'
        "http://e.com/3.jpg,three,z\n"
    )
    rows = list(iter_table_rows(str(path), "auto", "url", "caption", None))
    assert len(rows) == 3
    assert rows[0].caption == "one, quoted" and rows[0].source == {"extra": "x"}
    assert rows[1].problem and "2 fields" in rows[1].problem
    assert rows[2].url == "http://e.com/3.jpg"


def test_jsonl_with_garbage_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"url": "http://e.com/1.jpg", "caption": "c", "n": 1}\n\nnot json\n[1, 2]\n{"url": null}\n')
    rows = list(iter_table_rows(str(path), "auto", "url", "caption", None))
    assert len(rows) == 4  # the blank line is not a row
    assert rows[0].source == {"n": 1}
    assert "not JSON" in rows[1].problem and "expected an object" in rows[2].problem
    assert rows[3].url is None


def test_unreadable_parquet_and_missing_path(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable parquet"):
        list(iter_table_rows(str(bad), "auto", "url", None, None))
    with pytest.raises(InputError, match="does not exist"):
        list(iter_table_rows(str(tmp_path / "nope.csv"), "auto", "url", None, None))


def test_units_keep_every_row_and_keys_are_stable(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [{"url": f"http://example.com/{i}.jpg", "caption": f"c{i}"} for i in range(7)]
    lines[2]["url"] = "ftp://example.com/2.jpg"
    lines[5]["url"] = "http://127.0.0.1/5.jpg"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nbroken\n")
    plan, accepted, rejects = _units(tmp_path, iter_table_rows(str(path), "auto", "url", "caption", None))
    assert (plan.rows, plan.units, plan.screened_out) == (8, 3, 3)
    keys = [r["df_key"] for unit in accepted for r in unit] + [r["key"] for unit in rejects for r in unit]
    assert len(keys) == len(set(keys)) == 8
    by_key = {r["key"]: r for unit in rejects for r in unit}
    assert by_key["000000000002"]["reason"] == "unsupported_scheme"
    assert by_key["000000100002"]["reason"] == "private_address"
    assert by_key["000000200001"]["reason"] == "malformed_row"
    assert accepted[0][0] == {
        "url": "http://example.com/0.jpg",
        "caption": "c0",
        "df_key": "000000000000",
        "df_source": "{}",
    }
    _, again, _ = _units(tmp_path / "second", iter_table_rows(str(path), "auto", "url", "caption", None))
    assert again == accepted


def test_folder_rows_use_file_urls_and_sidecar_captions(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("a caption\n")
    (tmp_path / "a.png").write_bytes(b"y")
    (tmp_path / "notes.md").write_text("ignored")
    rows = list(iter_folder_rows(str(tmp_path)))
    assert [r.url.rsplit("/", 1)[1] for r in rows] == ["a.png", "b.jpg"]
    assert rows[0].caption is None and rows[1].caption == "a caption"
    assert rows[1].url.startswith("file:///")


def _flat(result):
    plan, accepted, rejects = result
    return plan, [r for unit in accepted for r in unit], [r for unit in rejects for r in unit]


def test_text_that_is_not_utf8_is_a_reject_row_not_a_crash(tmp_path):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"url": "http://example.com/0.jpg", "caption": "ok"}\n'
        '{"url": "http://example.com/1.jpg", "caption": "lone \\ud800 surrogate"}\n'
        '{"url": "http://example.com/2.jpg", "caption": "fine", "extra": "\\udfff"}\n'
    )
    plan, accepted, rejects = _flat(_units(tmp_path / "j", iter_table_rows(str(jsonl), "auto", "url", "caption", None)))
    assert plan.rows == 3 and [r["df_key"] for r in accepted] == ["000000000000"]
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("000000000001", "invalid_text"),
        ("000000000002", "invalid_text"),
    ]
    # a parquet string column holding invalid UTF-8 (written as binary, then relabelled as string)
    raw = pa.table(
        {
            "url": pa.array([b"http://example.com/a.jpg", b"http://example.com/\xff.jpg"], pa.binary()),
            "caption": pa.array([b"a", b"b"], pa.binary()),
        }
    )
    bad = raw.cast(pa.schema([("url", pa.string()), ("caption", pa.string())]), safe=False)
    pq.write_table(bad, tmp_path / "t.parquet")
    plan, accepted, rejects = _flat(
        _units(tmp_path / "p", iter_table_rows(str(tmp_path / "t.parquet"), "auto", "url", "caption", None))
    )
    assert plan.rows == 2 and len(accepted) == 1 and [r["reason"] for r in rejects] == ["invalid_text"]
    # a folder file name that is not UTF-8
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as fh:
        fh.write(b"y")
    plan, accepted, rejects = _flat(_units(tmp_path / "f", iter_folder_rows(str(folder)), allow_files=True))
    assert plan.rows == 2 and len(accepted) == 1 and [r["reason"] for r in rejects] == ["invalid_text"]


def test_folder_links_that_leave_the_folder_are_refused(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "inside.jpg").write_bytes(b"y")
    (folder / "link.jpg").symlink_to(outside)
    (folder / "local.jpg").symlink_to(folder / "inside.jpg")
    rows = list(iter_folder_rows(str(folder)))
    assert [(r.source["path"].rsplit("/", 1)[1], r.reason if r.problem else None) for r in rows] == [
        ("inside.jpg", None),
        ("link.jpg", "outside_folder"),
        ("local.jpg", None),
    ]
    assert all(r.problem is None for r in iter_folder_rows(str(folder), follow_symlinks=True))
