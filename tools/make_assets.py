"""Rebuild the real-data samples shipped in arxiv_ft/assets/ and data/ from the full splits (run once; output is
committed).

python tools/make_assets.py --shared ../shared/data

The shared validation split (the newest 50 papers of each class) is cut in two by hashed id: 20 a class are the
validation papers (every choice is made on them), the other 30 a class the test papers (final numbers only). Both
are newer than every training paper of their class; test is not newer than validation.
"""

import argparse
import json
import shutil
from pathlib import Path

from arxiv_ft.records import per_class_sample, read_records, write_records

ASSETS = Path(__file__).resolve().parent.parent / "arxiv_ft" / "assets"
DATA = ASSETS.parent.parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--validation-per-class", type=int, default=20)
    args = parser.parse_args()
    splits = Path(args.shared) / "arxiv" / "splits"
    train = per_class_sample(list(read_records(splits / "cs-train.jsonl")), args.train_per_class, seed=0)
    newest = list(read_records(splits / "cs-validation.jsonl"))
    valid = per_class_sample(newest, args.validation_per_class, seed=0)
    chosen = {r.id for r in valid}
    test = sorted((r for r in newest if r.id not in chosen), key=lambda r: (r.primary, r.id))
    print("train", write_records(train, ASSETS / "cs-train-sample.jsonl"))
    print("validation", write_records(valid, ASSETS / "cs-validation-sample.jsonl"))
    print("test", write_records(test, ASSETS / "cs-test-sample.jsonl"))
    print("data/validation", write_records(valid, DATA / "cs-validation.jsonl.gz"))
    print("data/test", write_records(test, DATA / "cs-test.jsonl.gz"))
    shutil.copy(splits / "cs-labels.txt", ASSETS / "cs-labels.txt")
    general = Path(args.shared) / "general"
    for name in ("wikitext2_raw_test.txt", "probe_mix_800.jsonl"):
        shutil.copy(general / name, ASSETS / name)
    print("general text", write_general_text(general / "boolq_dev.jsonl", ASSETS / "probe_mix_800.jsonl"))
    print("how-to text", write_howto_text(general / "hellaswag_val.jsonl", ASSETS / "probe_mix_800.jsonl"))


GENERAL_PASSAGES = 400


def write_general_text(boolq: Path, probe_items: Path) -> int:
    """General text for the KL-regularised objective: Wikipedia paragraphs (BoolQ dev passages, CC BY-SA 3.0), none
    of them a passage of a probe item, and not WikiText-2 (the perplexity probe's text): what the penalty sees and what
    the probes measure stay distinct. One passage a paragraph, blank lines between."""
    probe_ids = {json.loads(line)["id"] for line in probe_items.open()}
    rows = [json.loads(line) for line in boolq.open()]

    def passage(row) -> str:
        return row["question"].split("Passage:", 1)[-1].split("\nQuestion:")[0].strip()

    # By the first 120 characters: BoolQ repeats a passage across questions with small edits further on (one
    # penalty passage was a probe item's under another id until 2026-12-05; a test checks for it now).
    probed = {passage(r)[:120] for r in rows if r["id"] in probe_ids}
    out: list[str] = []
    for row in rows:
        text = passage(row)
        if text[:120] not in probed and text not in out:
            out.append(text)
    (ASSETS / "general_text_boolq.txt").write_text("\n\n".join(out[:GENERAL_PASSAGES]) + "\n", encoding="utf-8")
    return min(len(out), GENERAL_PASSAGES)


HOWTO_PASSAGES = 536  # ~228 kB, the length of the BoolQ text


def write_howto_text(hellaswag: Path, probe_items: Path) -> int:
    """A second penalty text that is not Wikipedia (the perplexity and KL probes' domain): WikiHow steps from HellaSwag
    validation (each context with its true ending, MIT licence), one article once, none from an article that a probe
    item comes from. About as long as the BoolQ text, so that only the domain differs."""
    probe_ids = {json.loads(line)["id"] for line in probe_items.open()}
    rows = [json.loads(line) for line in hellaswag.open()]
    howto = [r for r in rows if ": How to " in r["question"]]

    def article(row) -> str:
        return row["question"].split(". ", 1)[0]

    taken = {article(r) for r in howto if r["id"] in probe_ids}  # a probe's articles count as taken
    out: list[str] = []
    for row in howto:
        if article(row) not in taken:
            taken.add(article(row))
            out.append(f"{row['question'].split(': ', 1)[-1]} {row['choices'][row['answer_index']]}".strip())
    (ASSETS / "general_text_howto.txt").write_text("\n\n".join(out[:HOWTO_PASSAGES]) + "\n", encoding="utf-8")
    return min(len(out), HOWTO_PASSAGES)


if __name__ == "__main__":
    main()
