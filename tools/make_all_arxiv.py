"""The every-category task from the shared dump, reproducibly: its label set, balanced temporal splits, shipped samples.

    python tools/make_all_arxiv.py --dump '../shared/data/arxiv/dump/*.jsonl.gz' --out data/all-arxiv

Labels: every primary category with at least --min-papers papers in the dump (the rest are named in
`other-categories.txt` with their counts: a paper of theirs is outside the label set, and infer flags it). Per label,
as for the cs task: the newest --test papers are the test split, the next newest --validation the validation split
(both later than every training paper of their label), and up to --train of the older papers, drawn by hashed id, the
training split. `outside.jsonl.gz` holds --outside papers of the other categories (drawn by hashed id): papers the
label set cannot name, to measure how well the model flags them. Written as gzipped JSONL in the snapshot's field
names; `arxiv-ft train --config presets/all-arxiv.yaml` reads them.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("id", "title", "abstract", "categories", "update_date")


def read_dump(pattern: str):
    for path in sorted(glob.glob(pattern)):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def bucket(paper_id: str) -> str:
    return hashlib.sha256(f"all-arxiv:{paper_id}".encode()).hexdigest()


def write(path: Path, papers: list[dict]) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime 0: the same input gives the same bytes
        fh.write("".join(json.dumps({k: p[k] for k in FIELDS}, ensure_ascii=False) + "\n" for p in papers).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", default=str(ROOT.parent / "shared/data/arxiv/dump/*.jsonl.gz"))
    parser.add_argument("--out", default=str(ROOT / "data" / "all-arxiv"))
    parser.add_argument("--min-papers", type=int, default=100)
    parser.add_argument("--train", type=int, default=30)
    parser.add_argument("--validation", type=int, default=10)
    parser.add_argument("--test", type=int, default=10)
    parser.add_argument("--outside", type=int, default=300, help="papers of the other categories (out of the set)")
    args = parser.parse_args()

    by_label: dict[str, list[dict]] = defaultdict(list)
    for paper in read_dump(args.dump):
        by_label[paper["categories"].split()[0]].append(paper)
    counts = Counter({label: len(papers) for label, papers in by_label.items()})
    labels = sorted(label for label, n in counts.items() if n >= args.min_papers)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label in labels:
        papers = sorted(by_label[label], key=lambda p: (p["update_date"], p["id"]))  # oldest first
        newest = papers[len(papers) - args.test - args.validation :]
        splits["test"] += newest[args.validation :]
        splits["validation"] += newest[: args.validation]
        older = sorted(papers[: len(papers) - args.test - args.validation], key=lambda p: bucket(p["id"]))
        splits["train"] += older[: args.train]
    others = sorted((label for label in counts if label not in labels), key=lambda x: (-counts[x], x))
    outside = sorted((p for label in others for p in by_label[label]), key=lambda p: bucket(p["id"]))
    splits["outside"] = outside[: args.outside]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, papers in splits.items():
        write(out / f"{name}.jsonl.gz", sorted(papers, key=lambda p: bucket(p["id"])))
    (out / "labels.txt").write_text("".join(label + "\n" for label in labels))
    (out / "other-categories.txt").write_text("".join(f"{label}\t{counts[label]}\n" for label in others))
    n_other = sum(counts[label] for label in others)
    print(
        f"{len(labels)} labels (>= {args.min_papers} papers), {len(others)} other categories ({n_other} papers) -> "
        f"{out}: " + ", ".join(f"{name} {len(p)}" for name, p in splits.items())
    )


if __name__ == "__main__":
    main()
