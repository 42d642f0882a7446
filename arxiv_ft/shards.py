"""Sharded, resumable output of a run over a stream of items: one part file per process, merged in input order.

Each input item gets an index (its position in the input stream). Process r of W appends one JSON line per index
it owns to `OUT.part-{r:05d}-of-{W:05d}.jsonl`, in whole lines, fsynced after every batch. A restart reads every
part file (whatever world size wrote it), skips the indices found there, and truncates its own file after its last
complete line. Process 0 then merges all parts, by index and once per index, into OUT (JSONL, gzipped JSONL or
Parquet), `OUT.rejects.jsonl` and the summary. `OUT.run.json` records what decides a line's content (the model's
fingerprint, labels, prompt, mode, dtype, input); a restart with anything different is refused, so an output never
mixes two models or two settings.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from arxiv_ft.fileio import atomic_write, fsync_dir, read_json, write_json


def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def read_part(path: Path) -> tuple[list[tuple[int, int]], int]:
    """([(index, byte offset)] of the valid lines, length of the valid prefix): it ends at the first bad line."""
    entries, offset = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                index = json.loads(line)["index"]
            except (ValueError, KeyError, TypeError):
                break
            entries.append((index, offset))
            offset += len(line)
    return entries, offset


class ShardedOutput:
    """The part files, resume state, merge and side files of one output path, seen from process `rank` of `world`."""

    def __init__(self, out: str | Path, rank: int = 0, world: int = 1):
        self.out, self.rank, self.world = Path(out), rank, world
        self.mine = self.out.with_name(f"{self.out.name}.part-{rank:05d}-of-{world:05d}.jsonl")
        self._fh = None

    def side(self, suffix: str) -> Path:
        """A file that belongs to the output: OUT.run.json, OUT.rejects.jsonl, OUT.summary.json, OUT.input.jsonl."""
        return self.out.with_name(f"{self.out.name}.{suffix}")

    def parts(self) -> list[Path]:
        """Every part file of this output, whatever world size wrote it."""
        return sorted(self.out.parent.glob(f"{self.out.name}.part-*-of-*.jsonl"))

    def check_run(self, run: dict) -> None:
        """Refuse to resume an output that was started with other arguments or another model."""
        path = self.side("run.json")
        if not path.exists():
            return
        before = read_json(path)
        diff = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
        if diff:
            raise SystemExit(
                f"{self.out} was started with a different {', '.join(diff)} (see {path}): refusing to mix two runs; "
                f"use another --output, or delete {self.out}.* to start over"
            )

    def write_run(self, run: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.side("run.json"), run)

    def done(self) -> set[int]:
        """Indices already written by any process of any earlier attempt."""
        return {index for part in self.parts() for index, _ in read_part(part)[0]}

    def open(self) -> ShardedOutput:
        """Open this process's part for appending, after cutting a torn last line left by a crash."""
        if self.mine.exists():
            os.truncate(self.mine, read_part(self.mine)[1])
        self._fh = open(self.mine, "ab")
        return self

    def write(self, lines: list[dict]) -> None:
        """Append whole lines, then fsync: after a crash the file ends in complete lines or half of the last one."""
        if lines:
            self._fh.write(b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in lines))
            _sync(self._fh)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _merge_order(self, parts: list[Path], n_items: int):
        """(the line of each index, in index order, as positions into `files`/`offsets`; the part file of each line;
        its byte offset). A duplicate index keeps its first copy; a missing one is an error."""
        indices, files, offsets = array("q"), array("q"), array("q")
        for file_no, part in enumerate(parts):
            for index, offset in read_part(part)[0]:
                indices.append(index)
                files.append(file_no)
                offsets.append(offset)
        idx = np.frombuffer(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        unique, first = np.unique(idx[order], return_index=True)
        if len(unique) != n_items or (n_items and (unique[0] != 0 or unique[-1] != n_items - 1)):
            raise RuntimeError(f"the part files of {self.out} hold {len(unique)} of {n_items} items; run again")
        return order[first], files, offsets

    def merge(self, labels: list[str], n_items: int) -> dict:
        """Write the output and rejects in index order, each index once; return counts and metrics.

        Only (index, file, offset) triples are held in memory, not the lines, so a dump-sized merge stays small.
        A paper whose prompt could not fit is a reject, and counts as wrong in the metrics when its true label is
        in the label set (it was not classified), as train's evaluation counts it.
        """
        from arxiv_ft.metrics import classification_metrics

        parts = self.parts()
        picks, files, offsets = self._merge_order(parts, n_items)
        in_set = set(labels)
        y_true, y_pred, out_of_set, reasons = [], [], Counter(), Counter()
        kept_true, kept_pred = [], []  # in-set papers the model did not abstain on
        n_predicted, n_unfit, n_abstained, n_abstained_out = 0, 0, 0, 0
        handles = [open(p, "rb") for p in parts]
        rejects_path = self.side("rejects.jsonl")
        rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
        writer = open_writer(self.out)
        try:
            with open(rejects_tmp, "wb") as rejects:
                for k in picks:
                    fh = handles[files[k]]
                    fh.seek(offsets[k])
                    line = fh.readline()
                    obj = json.loads(line)
                    if "reject" in obj:
                        reject = obj["reject"]
                        rejects.write(json.dumps({"index": obj["index"], **reject}, ensure_ascii=False).encode())
                        rejects.write(b"\n")
                        reasons[re.sub(r"\d+", "N", reject["reason"].split(":")[0])] += 1
                        if reject.get("true") in in_set:  # a paper that could not be classified: wrong
                            n_unfit += 1
                            y_true.append(reject["true"])
                            y_pred.append(None)
                        continue
                    writer.write(line, obj)
                    n_predicted += 1
                    abstained = bool(obj.get("abstained"))
                    n_abstained += abstained
                    if obj["true"] in in_set:
                        y_true.append(obj["true"])
                        y_pred.append(obj["predicted"] if obj["predicted"] in in_set else None)
                        if not abstained:
                            kept_true.append(obj["true"])
                            kept_pred.append(y_pred[-1])
                    elif obj["true"] is not None:
                        out_of_set[obj["true"]] += 1
                        n_abstained_out += abstained
                _sync(rejects)
            writer.close()
        finally:
            for h in handles:
                h.close()
        os.replace(rejects_tmp, rejects_path)
        fsync_dir(rejects_path.parent)
        return {
            "n_predicted": n_predicted,
            "n_rejected": sum(reasons.values()),
            "rejects_by_reason": dict(reasons.most_common()),
            "n_true_in_label_set": len(y_true),
            "n_unfit_counted_wrong": n_unfit,
            "n_true_out_of_label_set": sum(out_of_set.values()),
            "out_of_label_set": dict(out_of_set.most_common(50)),
            "n_abstained": n_abstained,
            "n_abstained_true_out_of_label_set": n_abstained_out,
            # every in-set paper; an abstention counts as wrong
            "metrics": classification_metrics(y_true, y_pred, labels) if y_true else None,
            # the in-set papers the model answered: the accuracy of what abstention keeps
            "metrics_answered": classification_metrics(kept_true, kept_pred, labels)
            if n_abstained and kept_true
            else None,
        }

    def write_summary(self, summary: dict) -> None:
        write_json(self.side("summary.json"), summary)


class _JsonlWriter:
    """Merged JSONL (gzipped when the name ends in .gz): the part lines byte for byte, renamed into place when done."""

    def __init__(self, out: Path):
        self.out, self.tmp = out, out.with_name(out.name + ".tmp")
        self.raw = open(self.tmp, "wb")
        self.fh = gzip.GzipFile(fileobj=self.raw, mode="wb", mtime=0) if out.suffix == ".gz" else self.raw

    def write(self, line: bytes, obj: dict) -> None:
        self.fh.write(line)

    def close(self) -> None:
        if self.fh is not self.raw:
            self.fh.close()
        _sync(self.raw)
        self.raw.close()
        os.replace(self.tmp, self.out)


# Every field a row can have, with its Parquet type (a row holds the fields of its mode: infer.Rows).
def _types(pa) -> dict:
    top_k = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))
    return {
        "index": pa.int64(),
        "id": pa.string(),
        "predicted": pa.string(),
        "top_k": top_k,
        "confidence": pa.float64(),
        "label_mass": pa.float64(),
        "abstained": pa.bool_(),
        "generated": pa.string(),
        "true": pa.string(),
        "true_in_label_set": pa.bool_(),
        "label_set": pa.string(),
    }


class _ParquetWriter:
    """Merged Parquet: the rows' own fields, in their order (top_k as a list of {label, probability}); written in row
    groups of 50,000."""

    def __init__(self, out: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.pq, self.out, self.tmp, self.rows = pa, pq, out, out.with_name(out.name + ".tmp"), []
        self.schema, self.fh = None, None

    def write(self, line: bytes, obj: dict) -> None:
        if self.schema is None:  # every row of one output has the same fields (one mode, one model)
            types = _types(self.pa)
            self.schema = self.pa.schema([(name, types[name]) for name in obj])
            self.fh = self.pq.ParquetWriter(self.tmp, self.schema)
        row = dict(obj)
        if row.get("top_k") is not None:
            row["top_k"] = [{"label": label, "probability": p} for label, p in row["top_k"]]
        self.rows.append(row)
        if len(self.rows) >= 50_000:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.fh.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        if self.fh is None:  # no row at all: an empty file with the score mode's fields
            types = _types(self.pa)
            self.schema = self.pa.schema([(n, t) for n, t in types.items() if n != "generated"])
            self.fh = self.pq.ParquetWriter(self.tmp, self.schema)
        self._flush()
        self.fh.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.out)


def open_writer(out: Path):
    """The merged output's writer, by file name: .parquet, .jsonl.gz, anything else JSONL."""
    if out.suffix != ".parquet":
        return _JsonlWriter(out)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit(f"{out}: Parquet output needs pyarrow (pip install pyarrow), or use .jsonl") from None
    return _ParquetWriter(out)


def write_input_file(records, path: Path) -> int:
    """Fetched papers into a JSONL file, atomically: every process and every restart sees the same papers."""
    from arxiv_ft.records import Record

    lines = [json.dumps(r.to_json() if isinstance(r, Record) else r, ensure_ascii=False) for r in records]
    atomic_write(path, "".join(line + "\n" for line in lines))
    return len(lines)
