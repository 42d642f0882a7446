"""Read arXiv metadata (snapshot-format JSON lines, optionally gzipped) into records; label sets; samples.

No model, no network. Every reader streams: the real snapshot is ~4.5 GB.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Record:
    """One paper: the fields the task needs, in the snapshot's names; `categories[0]` is the primary category."""

    id: str
    title: str
    abstract: str
    categories: tuple[str, ...]
    update_date: str | None = None

    @property
    def primary(self) -> str:
        return self.categories[0]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "abstract": self.abstract,
            "categories": " ".join(self.categories),
            "update_date": self.update_date,
        }


@dataclass(frozen=True)
class Reject:
    """A line that could not become a record: where it was and why."""

    path: str
    line_no: int
    reason: str
    text: str  # the raw line (decoded leniently), so nothing the user gave is lost

    def to_json(self) -> dict:
        return {"path": self.path, "line_no": self.line_no, "reason": self.reason, "text": self.text}


class RecordError(ValueError):
    """A line of an input file is not a usable record; the message names the file and line."""


def _clean(text: str) -> str:
    # The snapshot wraps titles/abstracts with newlines and indentation; the API does the same.
    return _WHITESPACE.sub(" ", text).strip()


def parse_record(obj: object) -> Record:
    """Turn one decoded JSON object into a Record, or raise RecordError saying which field is wrong."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    for field in ("id", "title", "abstract", "categories"):
        if field not in obj:
            raise RecordError(f"missing field {field!r}")
        if not isinstance(obj[field], str):
            raise RecordError(f"field {field!r} is not a string")
    for field in ("id", "title", "abstract", "categories"):
        try:
            obj[field].encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON allows "\ud800"; no tokenizer or UTF-8 writer does
            raise RecordError(f"field {field!r} holds an unpaired surrogate at character {exc.start}") from None
    rid, title, abstract = obj["id"].strip(), _clean(obj["title"]), _clean(obj["abstract"])
    categories = tuple(obj["categories"].split())
    if not rid:
        raise RecordError("empty 'id'")
    if not title:
        raise RecordError("empty 'title'")
    if not abstract:
        raise RecordError("empty 'abstract'")
    if not categories:
        raise RecordError("empty 'categories'")
    update_date = obj.get("update_date")
    return Record(rid, title, abstract, categories, update_date if isinstance(update_date, str) else None)


def _open_binary_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        yield from fh


def _iter_parquet(path: Path) -> Iterator[tuple[int, Record | Reject]]:
    """Rows of a Parquet file (snapshot column names), streamed a record batch at a time."""
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            try:
                yield row_no, parse_record(row)
            except RecordError as exc:
                yield row_no, Reject(str(path), row_no, str(exc), json.dumps(row, default=str))


def iter_records_and_rejects(path: str | Path) -> Iterator[tuple[int, Record | Reject]]:
    """Yield (1-based line number, Record or Reject) for every non-blank line (or Parquet row); a truncated gzip
    ends in a Reject."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    line_no = 0
    try:
        for raw in _open_binary_lines(path):
            line_no += 1
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                if line_no == 1:
                    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first record
            except UnicodeDecodeError as exc:
                yield line_no, Reject(str(path), line_no, f"invalid UTF-8 at byte {exc.start}", _lenient(raw))
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:  # also: nested past the recursion limit, 4,300+-digit numbers
                yield line_no, Reject(str(path), line_no, f"malformed JSON: {_json_problem(exc)}", text.rstrip("\n"))
                continue
            try:
                yield line_no, parse_record(obj)
            except RecordError as exc:
                yield line_no, Reject(str(path), line_no, str(exc), text.rstrip("\n"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        # A gzip cut short mid-stream: everything before it was yielded; say where it stopped.
        yield line_no + 1, Reject(str(path), line_no + 1, f"truncated or corrupt gzip: {exc}", "")


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return f"a value cannot be read ({str(exc).split(';')[0]})"


def _lenient(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\n")


def read_records(path: str | Path) -> Iterator[Record]:
    """Stream the records of a JSONL file (gzipped if it ends in .gz); a bad line is an error naming it."""
    for line_no, item in iter_records_and_rejects(path):
        if isinstance(item, Reject):
            raise RecordError(f"{path}:{line_no}: {item.reason}")
        yield item


def write_records(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL in the snapshot's field names; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_labels(path: str | Path) -> list[str]:
    """A label file: one category id a line; blank lines and '#' comments ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    labels = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not labels:
        raise ValueError(f"{path}: no labels (one category id a line)")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"{path}: duplicate labels: {', '.join(repeated)}")
    return labels


def top_k_primaries(path: str | Path, k: int) -> list[str]:
    """The k most frequent primary categories of a file (ties broken by name), sorted by name."""
    counts = collections.Counter(r.primary for r in read_records(path))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return sorted(label for label, _ in ranked)


def check_labels(records: Iterable[Record], labels: list[str], source: str) -> list[Record]:
    """Materialise records whose primary category must be in `labels`; an unknown one is an error naming it."""
    out = list(records)
    refuse_unknown_labels([r.id for r in out], [r.primary for r in out], labels, source)
    return out


def refuse_unknown_labels(ids: list[str], primaries: list[str], labels: list[str], source: str) -> None:
    """The first row whose primary category is not in `labels`, as an error naming it: the one label check, for
    records here and dataset rows in sources.py."""
    allowed = set(labels)
    for i, primary in enumerate(primaries):
        if primary not in allowed:
            raise RecordError(
                f"{source}: record {i + 1} (id {ids[i]}) has primary category {primary!r}, "
                f"which is not in the label set ({len(labels)} labels: {', '.join(labels)}). "
                "Filter the data or pass a label set that includes it."
            )


def split_bucket(record_id: str, seed: int) -> float:
    """A stable number in [0, 1) for an id: splits depend on the id and seed only, not on file order."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def per_class_indices(ids: list[str], primaries: list[str], per_class: int, seed: int) -> list[int]:
    """At most `per_class` rows of each primary category, chosen by hashed id: the positions, in hashed-id order.
    The one sampling rule: records here, dataset rows in sources.sample."""
    order = sorted(range(len(ids)), key=lambda i: split_bucket(ids[i], seed))
    taken: collections.Counter[str] = collections.Counter()
    out = []
    for i in order:
        if taken[primaries[i]] < per_class:
            taken[primaries[i]] += 1
            out.append(i)
    return out


def per_class_sample(records: list[Record], per_class: int, seed: int) -> list[Record]:
    """At most `per_class` records of each primary category, chosen by hashed id; output order is by that hash."""
    picked = per_class_indices([r.id for r in records], [r.primary for r in records], per_class, seed)
    return [records[i] for i in picked]


def label_set(spec: str, train_file: str | Path) -> list[str]:
    """Labels from a spec: `top:K` (the K most frequent primaries of the training file), a label file, or `a,b,c`.

    A classifier needs at least two labels (with one, accuracy and macro-F1 are 1.0 whatever the model does), and
    each label once (a repeated label would be scored twice and split its probability).
    """
    if spec.startswith("top:"):
        labels, where = top_k_primaries(train_file, int(spec[4:])), f"{spec} of {train_file}"
    elif Path(spec).is_file():
        labels, where = read_labels(spec), str(spec)
    else:
        labels, where = [s.strip() for s in spec.split(",") if s.strip()], f"label set {spec!r}"
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"{where}: label(s) given more than once: {', '.join(repeated)}")
    if len(labels) < 2:
        raise ValueError(f"{where}: {len(labels)} label(s); a classifier needs at least 2 (a file, a,b,c or top:K)")
    return labels
