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
