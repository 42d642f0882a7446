"""Where training and evaluation papers come from: through `datasets`, from JSON/JSONL(.gz), Parquet or CSV files, a
folder written by `save_to_disk`, or a Hub dataset id (from the local cache when offline), with any column names.

A source becomes a `datasets.Dataset` with the columns the task needs (`id`, `title`, `abstract`, `primary`), checked
row by row: a bad record is an error naming the file and row (the line, for JSON lines). Nothing is held as Python
objects per paper: the rows stay in Arrow files that every process maps, and tokenisation (data.tokenize_dataset)
is cached beside them, so a second process or a requeued job reads the cache instead of tokenising again.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from pathlib import Path

from arxiv_ft import records as rec

_SUFFIXES = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Fields:
    """Which column holds what (the arXiv snapshot's names by default)."""

    id: str = "id"
    title: str = "title"
    abstract: str = "abstract"
    label: str = "categories"

    @classmethod
    def of(cls, cfg) -> Fields:
        return cls(cfg.id_field, cfg.title_field, cfg.abstract_field, cfg.label_field)


class SourceError(ValueError):
    """A data source that cannot be read, or a record in it that cannot be used; the message names where."""


def _builder(spec: str) -> str | None:
    path = Path(spec)
    if path.is_file():
        suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
        if suffix not in _SUFFIXES:
            raise SourceError(f"{spec}: unknown file kind {suffix!r}; give JSON/JSONL(.gz), Parquet or CSV")
        return _SUFFIXES[suffix]
    return None


def _content_cache(spec: str) -> str:
    """A `datasets` cache folder for this file's content: `datasets` keys local files by path and mtime only, so a file
    changed with its mtime restored was read from the old cache (a run trained on rows the file no longer held)."""
    from arxiv_ft.fileio import cache_root, file_digest

    return str(cache_root() / "sources" / file_digest(spec)[:32])


def load_raw(spec: str, split: str):
    """The rows of a source as a `datasets.Dataset`, columns as the source has them."""
    import datasets

    datasets.disable_progress_bars()
    kind = _builder(spec)
    cache = _content_cache(spec) if kind is not None else None
    if kind == "json" and not any(line.strip() for _, line in zip(range(1000), _lines(spec))):
        return datasets.Dataset.from_dict({})  # an empty file: no papers (pyarrow refuses to read it at all)
    if kind == "json":
        _refuse_deep_lines(spec)
    try:
        if kind == "csv":
            # Every column as text: type inference would turn the id 2511.18900 into the float 2511.189 (and the
            # title "NA" into a missing value).
            features = datasets.Features({name: datasets.Value("string") for name in _csv_header(spec)})
            return datasets.load_dataset(
                "csv",
                data_files=spec,
                split="train",
                features=features,
                keep_default_na=False,
                na_filter=False,
                encoding="utf-8-sig",  # a byte-order mark (Excel writes one) is not part of the first column's name
                cache_dir=cache,
            )
        if kind == "parquet" and _parquet_rows(spec) == 0:
            return datasets.Dataset.from_dict({})  # no papers (datasets says "corresponds to no data")
        if kind is not None:
            return datasets.load_dataset(kind, data_files=spec, split="train", cache_dir=cache)
        if Path(spec).is_dir():
            loaded = datasets.load_from_disk(spec)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SourceError(f"{spec}: no split {split!r} (it has {', '.join(loaded)}); pass the split")
                return loaded[split]
            return loaded
        return datasets.load_dataset(spec, split=split)  # a Hub id: the local cache when offline
    except SourceError:
        raise
    except FileNotFoundError as exc:
        raise SourceError(f"{spec}: no such file, folder or cached Hub dataset ({exc})") from None
    except Exception as exc:  # pyarrow/json errors: find the line with the project's own reader when it can
        if kind == "json":
            for line_no, item in rec.iter_records_and_rejects(spec):
                if isinstance(item, rec.Reject) and item.reason.startswith(("malformed JSON", "invalid UTF-8")):
                    raise SourceError(f"{spec}:{line_no}: {item.reason}") from None
        raise SourceError(f"{spec}: cannot be read as {kind or 'a dataset'}: {exc}") from None


_BRACKETS = 1000  # a line with more brackets than this is parsed once here first (a 3,000-author list is fine)


def _refuse_deep_lines(spec: str) -> None:
    """pyarrow's JSON reader crashes the process (a segmentation fault, no message) on a line nested ~10^5 deep: such
    a line is found first, by Python's parser, which refuses it, and named."""
    for line_no, line in enumerate(_lines(spec), 1):
        if line.count(b"[") + line.count(b"{") > _BRACKETS:
            try:
                json.loads(line)
            except RecursionError:
                raise SourceError(f"{spec}:{line_no}: malformed JSON: nested too deeply to read") from None
            except ValueError:
                pass  # pyarrow reads it and fails cleanly; the error handler below names the line


def _csv_header(spec: str) -> list[str]:
    """A CSV file's column names, after checking what pandas would report only as "An error occurred while generating
    the dataset": a column named twice, a row with more or fewer fields than the header (named by line)."""
    import csv

    with open(spec, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise SourceError(f"{spec}: column {', '.join(map(repr, twice))} appears more than once in the header")
        for row in reader:
            if row and len(row) != len(header):
                raise SourceError(
                    f"{spec}:{reader.line_num}: {len(row)} fields where the header has {len(header)} (an unquoted "
                    "comma or a missing field?)"
                )
    return header


def _parquet_rows(spec: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(spec).metadata.num_rows
    except Exception:  # not readable: datasets' own error names it below
        return -1


def _lines(spec: str):
    import gzip

    with (gzip.open if spec.endswith(".gz") else open)(spec, "rb") as fh:
        yield from fh


def _clean(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def normalise(ds, fields: Fields, where: str):
    """Rename and check: `id`, `title`, `abstract` (whitespace collapsed), `primary` (the label column's first
    entry). A missing column or a bad row is a SourceError naming it."""
    if ds.num_rows == 0:
        import datasets

        return datasets.Dataset.from_dict({"id": [], "title": [], "abstract": [], "primary": []})
    missing = [c for c in (fields.title, fields.abstract, fields.label) if c not in ds.column_names]
    if missing:
        names = ", ".join(map(repr, missing))
        raise SourceError(f"{where}: no column {names} (columns: {', '.join(ds.column_names)})")
    has_id = fields.id in ds.column_names
    line_numbers = where.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))

    def row(example, index):
        where_row = f"{where}:{index + 1}" if line_numbers else f"{where} row {index + 1}"
        values = {}
        for name, column in (("title", fields.title), ("abstract", fields.abstract)):
            value = example[column]
            if not isinstance(value, str) or not _clean(value):
                raise SourceError(f"{where_row}: empty or missing {column!r}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise SourceError(f"{where_row}: {column!r} holds an unpaired surrogate") from None
            values[name] = _clean(value)
        label = example[fields.label]
        if label is not None and not isinstance(label, (str, list, tuple)):
            raise SourceError(f"{where_row}: {fields.label!r} is {label!r}; give a category or a list of categories")
        label = label.split() if isinstance(label, str) else list(label or [])
        if not label or not isinstance(label[0], str):
            raise SourceError(f"{where_row}: empty or missing {fields.label!r}")
        paper_id = example[fields.id] if has_id else index
        # Ids are keys (the in-run TF-IDF looks each paper's text up by id; outputs are joined on them): a null id
        # became the string "None" for every such paper.
        if paper_id is None or (isinstance(paper_id, float) and paper_id != paper_id) or not str(paper_id).strip():
            raise SourceError(f"{where_row}: empty or missing id in {fields.id!r} (ids must be unique and non-null)")
        return {"id": str(paper_id).strip(), "primary": label[0], **values}

    keep = ["id", "title", "abstract", "primary"]
    out = ds.map(row, with_indices=True, remove_columns=[c for c in ds.column_names if c not in keep], desc=None)
    seen: dict[str, int] = {}
    for index, paper_id in enumerate(out["id"]):
        if paper_id in seen:
            where_row = f"{where}:{index + 1}" if line_numbers else f"{where} row {index + 1}"
            raise SourceError(f"{where_row}: id {paper_id!r} repeats row {seen[paper_id] + 1} (ids must be unique)")
        seen[paper_id] = index
    return out


def load_split(spec: str, split: str, fields: Fields):
    """A checked, normalised dataset of one source."""
    return normalise(load_raw(spec, split), fields, spec)


def label_set(spec: str, train) -> list[str]:
    """Labels from a spec (records.label_set), where `top:K` counts the training dataset's primaries."""
    if not spec.startswith("top:"):
        return rec.label_set(spec, "")
    counts = collections.Counter(train["primary"])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: int(spec[4:])]
    labels = sorted(label for label, _ in ranked)
    if len(labels) < 2:
        raise ValueError(f"{spec}: {len(labels)} label(s); a classifier needs at least 2")
    return labels


def check_labels(ds, labels: list[str], where: str) -> None:
    """Every primary category must be in the label set; the first that is not is an error naming the row and id."""
    rec.refuse_unknown_labels(ds["id"], ds["primary"], labels, where)


def sample(ds, per_class: int, seed: int):
    """The per-class sample of a dataset (all rows when per_class is 0), in hashed-id order."""
    if not per_class:
        return ds
    return ds.select(rec.per_class_indices(ds["id"], ds["primary"], per_class, seed))


def to_records(ds) -> list[rec.Record]:
    """Rows as records (for the evaluation set and the TF-IDF baseline; training reads Arrow rows instead)."""
    return [rec.Record(r["id"], r["title"], r["abstract"], (r["primary"],)) for r in ds]


def load_papers(cfg):
    """(labels, training dataset, evaluation records) of a train/baseline config: labels checked, sampled per class.

    Training papers are sampled with the run's seed; evaluation papers always with seed 0, so every run and the
    TF-IDF baseline are scored on the same papers.
    """
    fields = Fields.of(cfg)
    train = load_split(cfg.train_file, cfg.train_split, fields)
    labels = label_set(cfg.labels, train)
    evals = load_split(cfg.eval_file, cfg.eval_split, fields)
    check_labels(train, labels, cfg.train_file)
    check_labels(evals, labels, cfg.eval_file)
    return labels, sample(train, cfg.train_per_class, cfg.seed), to_records(sample(evals, cfg.eval_per_class, 0))


def load_test(cfg, labels: list[str]) -> list:
    """The test records of a train config (none without --test-file), sampled per class with seed 0 like evaluation.

    A test paper that is also a validation or training paper would make the test number a selection number: refused
    by the caller, which knows those papers."""
    if not cfg.test_path:
        return []
    fields = Fields.of(cfg)
    test = load_split(cfg.test_path, cfg.test_split, fields)
    check_labels(test, labels, cfg.test_path)
    return to_records(sample(test, cfg.test_per_class, 0))
