"""Data in through `datasets`: every kind of source and column naming gives the same papers; bad rows are named;
tokenisation is cached, so a second process or a requeued job does not tokenise again."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from arxiv_ft.data import PromptBuilder, tokenize_dataset, tokenize_records
from arxiv_ft.prompts import get_template
from arxiv_ft.records import RecordError, read_records
from arxiv_ft.sources import Fields, SourceError, load_papers, load_split, to_records
from tests.conftest import ASSETS

N = 40


@pytest.fixture(scope="module")
def papers():
    return list(read_records(ASSETS / "cs-train-sample.jsonl"))[:N]


def renamed_rows(papers, label_as: str = "list"):
    """The papers with other column names: Title / Summary / Tags (a list, or the primary alone) / Key."""
    rows = []
    for r in papers:
        tags = list(r.categories) if label_as == "list" else r.primary
        rows.append({"Key": r.id, "Title": r.title, "Summary": r.abstract, "Tags": tags, "extra": 1})
    return rows


RENAMED = Fields(id="Key", title="Title", abstract="Summary", label="Tags")


def write_sources(tmp_path, papers) -> dict[str, tuple[str, Fields]]:
    import datasets

    jsonl = tmp_path / "papers.jsonl"
    jsonl.write_text("".join(json.dumps(r.to_json()) + "\n" for r in papers))
    gz = tmp_path / "papers.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    ds = datasets.Dataset.from_list(renamed_rows(papers))
    ds.to_parquet(str(tmp_path / "papers.parquet"))
    datasets.Dataset.from_list(renamed_rows(papers, "primary")).to_csv(str(tmp_path / "papers.csv"), index=False)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(tmp_path / "saved"))
    return {
        "jsonl": (str(jsonl), Fields()),
        "jsonl.gz": (str(gz), Fields()),
        "parquet": (str(tmp_path / "papers.parquet"), RENAMED),
        "csv": (str(tmp_path / "papers.csv"), RENAMED),
        "save_to_disk": (str(tmp_path / "saved"), RENAMED),
    }


def test_every_kind_of_source_gives_the_same_papers(tmp_path, papers):
    for kind, (spec, fields) in write_sources(tmp_path, papers).items():
        got = to_records(load_split(spec, "train", fields))
        assert [(r.id, r.title, r.abstract, r.primary) for r in got] == [
            (r.id, r.title, r.abstract, r.primary) for r in papers
        ], kind


def test_a_hub_dataset_id_loads_from_the_local_cache_offline(tmp_path, papers, monkeypatch):
    """What `load_dataset("org/name")` leaves in the datasets cache after a download, loaded offline by id."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    ds = datasets.Dataset.from_list(renamed_rows(papers))
    root = tmp_path / "datasets-cache" / "arxiv-ft-test___papers" / "default" / "0.0.0" / "0123456789abcdef"
    root.mkdir(parents=True)
    with ArrowWriter(path=str(root / "papers-train.arrow"), features=ds.features) as writer:
        writer.write_table(ds.data.table)
        writer.finalize()
    splits = datasets.SplitDict(dataset_name="papers")
    splits.add(datasets.SplitInfo(name="train", num_examples=len(ds), dataset_name="papers"))
    info = datasets.DatasetInfo(features=ds.features, config_name="default", dataset_name="papers", splits=splits)
    info.write_to_directory(str(root))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    got = to_records(load_split("arxiv-ft-test/papers", "train", RENAMED))
    assert [r.id for r in got] == [r.id for r in papers]


def test_a_bad_row_is_named_by_file_and_line_and_a_missing_column_by_name(tmp_path, papers):
    rows = [r.to_json() for r in papers[:5]]
    rows[3]["abstract"] = "   "
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SourceError, match=r"bad.jsonl:4: empty or missing 'abstract'"):
        load_split(str(path), "train", Fields())
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n" + '{"id": "x", "title": "Broken\n')
    with pytest.raises(SourceError, match=r"broken.jsonl:2: malformed JSON"):
        load_split(str(broken), "train", Fields())
    with pytest.raises(SourceError, match=r"no column 'Summary'"):
        load_split(str(path), "train", Fields(abstract="Summary"))


def test_train_and_baseline_read_the_same_papers_from_any_source(tmp_path, papers):
    from arxiv_ft.options import BaselineConfig, TrainConfig

    sources = write_sources(tmp_path, papers)
    spec, fields = sources["parquet"]
    mapping = {"id_field": fields.id, "title_field": fields.title, "abstract_field": fields.abstract}
    mapping["label_field"] = fields.label
    for cls in (TrainConfig, BaselineConfig):
        cfg = cls(train_file=spec, eval_file=sources["csv"][0], train_per_class=1, eval_per_class=1, **mapping)
        labels, train, evals = load_papers(cfg)
        assert len(train) == len({r.primary for r in papers}) and len(evals) == len(train)
    with pytest.raises(RecordError, match="not in the label set"):
        load_papers(TrainConfig(train_file=spec, eval_file=sources["csv"][0], labels="cs.AI,cs.XX", **mapping))


def test_tokenisation_is_cached_and_equals_the_in_memory_path(tmp_path, papers, tokenizer, labels):
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 160)
    ds = load_split(str(write_sources(tmp_path, papers)["jsonl"][0]), "train", Fields())
    examples, stats, has_prefix = tokenize_dataset(builder, ds, tmp_path / "cache")
    want, want_stats = tokenize_records(builder, papers)
    assert [(e.id, e.prompt_ids, e.target_ids, e.label_index) for e in examples] == [
        (e.id, e.prompt_ids, e.target_ids, e.label_index) for e in want
    ]
    assert stats["kept"] == want_stats.kept and stats["truncated"] == want_stats.truncated and has_prefix
    assert list(examples.lengths) == [len(e.input_ids) for e in want]
    # A second process (or a requeued job) with the same inputs reads the cache: nothing is tokenised again.
    calls = []
    original = builder.example
    builder.example = lambda *a, **k: calls.append(1) or original(*a, **k)
    again, _, _ = tokenize_dataset(builder, ds, tmp_path / "cache")
    assert calls == [] and [e.prompt_ids for e in again] == [e.prompt_ids for e in examples]
    # Another prompt budget is another cache entry.
    builder.example = original
    other = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 200)
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 1
    tokenize_dataset(other, ds, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tokenized-*.arrow"))) == 2
    shutil.rmtree(tmp_path / "cache")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_a_changed_file_is_read_again_even_with_its_mtime_restored(tmp_path, papers, kind, monkeypatch):
    """`datasets` keys local files by path and mtime: a file rewritten and given its old mtime back was read from
    the stale cache (a run trained on rows the file no longer held). The cache is keyed by content."""
    import os

    monkeypatch.setenv("ARXIV_FT_CACHE", str(tmp_path / "cache"))
    path, fields = write_sources(tmp_path, papers)[kind]
    first = load_split(path, "train", fields)
    assert first.num_rows == N
    stat = os.stat(path)
    (tmp_path / "shorter").mkdir()
    shorter, _ = write_sources(tmp_path / "shorter", papers[:7])[kind]
    shutil.copyfile(shorter, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
    again = load_split(path, "train", fields)
    assert again.num_rows == 7 and again["id"] == [p.id for p in papers[:7]]


def test_null_or_repeated_ids_are_refused_naming_the_row(tmp_path, papers):
    """Ids are keys: null ids all became "None" and the in-run TF-IDF (which looks texts up by id) fell to 3.8%."""
    import datasets

    rows = renamed_rows(papers[:6])
    rows[3]["Key"] = None
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "null.parquet"))
    with pytest.raises(SourceError, match="row 4: empty or missing id"):
        load_split(str(tmp_path / "null.parquet"), "train", RENAMED)
    rows[3]["Key"] = rows[1]["Key"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "twice.parquet"))
    with pytest.raises(SourceError, match="row 4: id .* repeats row 2"):
        load_split(str(tmp_path / "twice.parquet"), "train", RENAMED)


def test_a_numeric_label_column_is_a_clear_error(tmp_path, papers):
    import datasets

    rows = [{"id": r.id, "title": r.title, "abstract": r.abstract, "categories": float("nan")} for r in papers[:3]]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "floats.parquet"))
    with pytest.raises(SourceError, match="row 1: 'categories' is nan"):
        load_split(str(tmp_path / "floats.parquet"), "train", Fields())


@pytest.mark.parametrize("damage", ["emptied", "cut short", "replaced"])
def test_a_damaged_or_replaced_tokenisation_cache_entry_is_rebuilt(tmp_path, papers, tokenizer, labels, damage):
    """An emptied or truncated cache entry crashed every later run (ArrowInvalid); one replaced under its own name (8
    rows, all one label) was trained on silently. Each is rebuilt from the papers."""
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 160)
    ds = load_split(str(write_sources(tmp_path, papers)["jsonl"][0]), "train", Fields())
    cache = tmp_path / "cache"
    want = [e.prompt_ids for e in tokenize_dataset(builder, ds, cache)[0]]
    (entry,) = cache.glob("tokenized-*.arrow")
    if damage == "emptied":
        entry.write_bytes(b"")
    elif damage == "cut short":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    else:  # a valid Arrow file of other rows, written by the same code for 8 papers of one label
        (tmp_path / "few").mkdir()
        few = load_split(str(write_sources(tmp_path / "few", papers[:8])["jsonl"][0]), "train", Fields())
        other = tokenize_dataset(builder, few, tmp_path / "other")[0]
        (written,) = (tmp_path / "other").glob("tokenized-*.arrow")
        shutil.copy(written, entry)
        assert len(other) == 8
    again, stats, _ = tokenize_dataset(builder, ds, cache)
    assert [e.prompt_ids for e in again] == want and stats["kept"] == N


def test_a_failed_tokenisation_leaves_no_temporary_file(tmp_path, papers, tokenizer, labels, monkeypatch):
    """A full disk while `datasets` wrote the cache entry left its temporary file behind."""
    from datasets import arrow_writer

    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 160)
    ds = load_split(str(write_sources(tmp_path, papers)["jsonl"][0]), "train", Fields())

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(arrow_writer.ArrowWriter, "finalize", disk_full)
        with pytest.raises(OSError, match="No space left"):
            tokenize_dataset(builder, ds, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    assert len(tokenize_dataset(builder, ds, tmp_path / "cache")[0]) == N


def test_csv_with_a_bom_is_read_and_broken_csv_or_empty_parquet_is_named(tmp_path, papers):
    """A CSV saved by Excel (UTF-8 byte-order mark) failed with "An error occurred while generating the dataset", as
    did ragged rows; a column named twice was read silently; an empty Parquet file said "corresponds to no data"."""
    import csv

    import datasets

    header = ["id", "title", "abstract", "categories"]
    rows = [[r.id, r.title, r.abstract, r.primary] for r in papers[:5]]

    def write(name, table, encoding="utf-8"):
        with open(tmp_path / name, "w", newline="", encoding=encoding) as fh:
            csv.writer(fh).writerows(table)
        return str(tmp_path / name)

    ds = load_split(write("bom.csv", [header, *rows], "utf-8-sig"), "train", Fields())
    assert ds["id"] == [r[0] for r in rows] and ds["primary"] == [r[3] for r in rows]
    with pytest.raises(SourceError, match=r"dup.csv: column 'title' appears more than once"):
        load_split(write("dup.csv", [[*header, "title"], *[[*r, r[1]] for r in rows]]), "train", Fields())
    ragged = [header, *rows[:2], [*rows[2], "extra"], *rows[3:]]
    with pytest.raises(SourceError, match=r"ragged.csv:4: 5 fields where the header has 4"):
        load_split(write("ragged.csv", ragged), "train", Fields())
    datasets.Dataset.from_dict({name: [] for name in header}).to_parquet(str(tmp_path / "empty.parquet"))
    assert len(load_split(str(tmp_path / "empty.parquet"), "train", Fields())) == 0
