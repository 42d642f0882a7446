"""Rebuild the real-data samples shipped in arxiv_ft/assets/ from the full splits (run once; output is committed).

python tools/make_assets.py --shared ../shared/data
"""

import argparse
import shutil
from pathlib import Path

from arxiv_ft.records import per_class_sample, read_records, write_records

ASSETS = Path(__file__).resolve().parent.parent / "arxiv_ft" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--validation-per-class", type=int, default=20)
    args = parser.parse_args()
    splits = Path(args.shared) / "arxiv" / "splits"
    train = per_class_sample(list(read_records(splits / "cs-train.jsonl")), args.train_per_class, seed=0)
    valid = per_class_sample(list(read_records(splits / "cs-validation.jsonl")), args.validation_per_class, seed=0)
    print("train", write_records(train, ASSETS / "cs-train-sample.jsonl"))
    print("validation", write_records(valid, ASSETS / "cs-validation-sample.jsonl"))
    shutil.copy(splits / "cs-labels.txt", ASSETS / "cs-labels.txt")
    general = Path(args.shared) / "general"
    for name in ("wikitext2_raw_test.txt", "probe_mix_800.jsonl"):
        shutil.copy(general / name, ASSETS / name)


if __name__ == "__main__":
    main()
