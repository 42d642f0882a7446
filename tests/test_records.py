"""Reading snapshot-format JSONL (plain and gzipped), rejects, label sets and deterministic splits."""

from __future__ import annotations

import json

import pytest

from arxiv_ft.records import (
    RecordError,
    Reject,
    check_labels,
    iter_records_and_rejects,
    label_set,
    per_class_sample,
    read_records,
    top_k_primaries,
    write_records,
)
from tests.conftest import ROOT

SNAPSHOT = ROOT / "tests" / "fixtures" / "arxiv-metadata-oai-snapshot-first200.json"


def test_reads_the_real_snapshot_sample_with_all_its_extra_fields():
    records = list(read_records(SNAPSHOT))
    assert len(records) == 200
    first = records[0]
    assert first.id == "0704.0001"
    assert first.primary == "hep-ph"
    assert "\n" not in first.abstract and not first.abstract.startswith(" ")
    assert records[1].categories == ("math.CO", "cs.CG")  # primary first, all kept


def test_gzip_round_trip(tmp_path, train_records):
    path = tmp_path / "x.jsonl.gz"
    assert write_records(train_records[:10], path) == 10
    assert list(read_records(path)) == train_records[:10]


def test_bad_lines_become_rejects_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "1", "title": "T", "abstract": "A", "categories": "cs.LG"}
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({**good, "title": "  "}).encode(),
        json.dumps({"id": "3", "abstract": "A", "categories": "cs.LG"}).encode(),
        b'{"id": "4", "title": "\xff", "abstract": "A", "categories": "cs.LG"}',
        b"",
        json.dumps({**good, "id": "5", "extra": [1, 2]}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    items = list(iter_records_and_rejects(path))
    rejects = {n: r.reason for n, r in items if isinstance(r, Reject)}
    assert [r.id for _, r in items if not isinstance(r, Reject)] == ["1", "5"]
    assert set(rejects) == {2, 3, 4, 5}
    assert "malformed JSON" in rejects[2] and "empty 'title'" in rejects[3]
    assert "missing field 'title'" in rejects[4] and "invalid UTF-8" in rejects[5]
    with pytest.raises(RecordError, match=r"bad.jsonl:2: malformed JSON"):
        list(read_records(path))


def test_truncated_gzip_yields_what_it_can_then_a_reject(tmp_path, train_records):
    path = tmp_path / "cut.jsonl.gz"
    write_records(train_records[:200], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    items = list(iter_records_and_rejects(path))
    assert isinstance(items[-1][1], Reject) and "gzip" in items[-1][1].reason
    assert 10 < len(items) < 200


def test_unknown_label_is_an_error_naming_record_and_label(train_records, labels):
    bad = train_records[:3] + [train_records[3].__class__("9999.1", "T", "A", ("math.CO",))]
    with pytest.raises(RecordError, match=r"record 4 \(id 9999.1\).*'math.CO'"):
        check_labels(bad, labels, "train.jsonl")


def test_label_sets(tmp_path, train_records):
    path = tmp_path / "t.jsonl"
    write_records(train_records, path)
    assert top_k_primaries(path, 3) == sorted(top_k_primaries(path, 3))
    assert len(label_set("top:5", path)) == 5
    assert label_set("cs.LG, cs.AI", path) == ["cs.LG", "cs.AI"]
    with pytest.raises(ValueError, match="label set"):
        label_set("nonsense", path)


def test_per_class_samples_depend_on_ids_not_file_order(train_records):
    sample = per_class_sample(train_records, 3, seed=0)
    assert len(sample) == 3 * len({r.primary for r in train_records})
    assert per_class_sample(list(reversed(train_records)), 3, seed=0) == sample


def test_a_lone_surrogate_is_a_bad_record_not_a_crash_later(tmp_path):
    """JSON allows "\\ud800"; no tokenizer or UTF-8 writer does: the line is rejected, naming the field."""
    path = tmp_path / "s.jsonl"
    good = {"id": "1", "title": "Fine", "abstract": "Fine.", "categories": "cs.LG"}
    lines = [json.dumps(good), json.dumps(good).replace("Fine.", "Bad \\ud800 one."), json.dumps(good | {"id": "3"})]
    path.write_text("\n".join(lines) + "\n")
    items = list(iter_records_and_rejects(path))
    assert isinstance(items[1][1], Reject) and "surrogate" in items[1][1].reason and "'abstract'" in items[1][1].reason
    assert [type(x).__name__ for _, x in items] == ["Record", "Reject", "Record"]
    with pytest.raises(RecordError, match=r"s.jsonl:2: field 'abstract' holds an unpaired surrogate"):
        list(read_records(path))


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    record = {"id": "1", "title": "T", "abstract": "A.", "categories": "cs.LG"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    assert [r.id for r in read_records(path)] == ["1"]


def test_label_sets_refuse_repeats_single_labels_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="more than once: cs.LG"):
        label_set("cs.LG,cs.AI,cs.LG", "")
    with pytest.raises(ValueError, match="at least 2"):
        label_set("cs.LG", "")
    one = tmp_path / "one.txt"
    one.write_text("cs.LG\n")
    with pytest.raises(ValueError, match="at least 2"):
        label_set(str(one), "")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no labels"):
        label_set(str(empty), "")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "1", "title": "T", "abstract": "A.", "categories": "cs.LG"}) + "\n")
    with pytest.raises(ValueError, match="at least 2"):
        label_set("top:1", train)


def test_parquet_rows_stream_as_records_with_rejects(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"id": "1", "title": "T", "abstract": "A.", "categories": "cs.LG"},
        {"id": "2", "title": "", "abstract": "A.", "categories": "cs.LG"},
        {"id": "3", "title": "T3", "abstract": "A3.", "categories": "cs.AI cs.LG"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    items = list(iter_records_and_rejects(tmp_path / "p.parquet"))
    assert [(n, type(x).__name__) for n, x in items] == [(1, "Record"), (2, "Reject"), (3, "Record")]
    assert items[2][1].primary == "cs.AI"


def test_a_line_nested_too_deeply_or_with_a_huge_number_is_a_rejected_line(tmp_path):
    """One such line crashed infer.py (RecursionError / ValueError) and the training load."""
    from arxiv_ft.sources import Fields, SourceError, load_split

    good = {"id": "1", "title": "T", "abstract": "A", "categories": "cs.LG"}
    nested = '{"id": "2", "title": "T", "abstract": "A", "categories": "cs.LG", "x": ' + "[" * 200_000
    nested += "]" * 200_000 + "}"
    huge = '{"id": "3", "title": "T", "abstract": "A", "categories": "cs.LG", "n": ' + "9" * 5000 + "}"
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join([json.dumps(good), nested, huge, json.dumps({**good, "id": "4"})]) + "\n")
    items = list(iter_records_and_rejects(path))
    assert [r.id for _, r in items if not isinstance(r, Reject)] == ["1", "4"]
    rejects = {n: r.reason for n, r in items if isinstance(r, Reject)}
    assert rejects[2] == "malformed JSON: nested too deeply to read"
    assert rejects[3].startswith("malformed JSON: a value cannot be read (Exceeds the limit (4300 digits)")
    with pytest.raises(SourceError, match=r"odd.jsonl:2: malformed JSON: nested too deeply"):
        load_split(str(path), "train", Fields())
