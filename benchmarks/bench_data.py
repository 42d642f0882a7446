"""Reading and tokenising a large training file: Python lists in every process (before) vs `datasets` + a cached
Arrow file (now), time and peak memory per process.

    python benchmarks/bench_data.py --input '../shared/data/arxiv/dump/*.jsonl.gz' \\
        --out benchmarks/results/data-cpu.json

Each variant runs in a fresh process (peak RSS is per process): `lists` reads the records and tokenises them into
Python lists, as every process of every start did before; `datasets-cold` reads with `datasets` and tokenises with
`Dataset.map` into the cache (what the main process does on a first start); `datasets-warm` is the same call again
(what every other process, and every later start or Slurm requeue with the same inputs, does). The input is
filtered to papers whose primary category is in the label set first (into a temporary JSONL file, not timed).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(variant: str, path: str, cache: str, max_seq_tokens: int) -> dict:
    """One variant, in this process; returns its seconds, peak RSS and example count."""
    from arxiv_ft.data import PromptBuilder, tokenize_dataset, tokenize_records
    from arxiv_ft.modeling import load_tokenizer
    from arxiv_ft.prompts import get_template
    from arxiv_ft.records import read_labels, read_records

    labels = read_labels(ROOT / "arxiv_ft" / "assets" / "cs-labels.txt")
    tokenizer = load_tokenizer("smollm2-135m")
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, max_seq_tokens, budget="paper")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if variant == "lists":
        examples, _ = tokenize_records(builder, list(read_records(path)))
    else:
        from arxiv_ft.sources import Fields, load_split

        examples, _, _ = tokenize_dataset(builder, load_split(path, "train", Fields()), cache)
        examples.lengths.sum()  # what a batch plan reads of every example
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": variant,
        "examples": len(examples),
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": peak - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(ROOT.parent / "shared/data/arxiv/dump/*.jsonl.gz"))
    parser.add_argument("--limit", type=int, default=0, help="at most this many papers (0 = all in the label set)")
    parser.add_argument("--max-seq-tokens", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, path, cache, tokens = args.child
        print(json.dumps(child(variant, path, cache, int(tokens))))
        return
    labels = set((ROOT / "arxiv_ft" / "assets" / "cs-labels.txt").read_text().split())
    with tempfile.TemporaryDirectory() as tmp:
        filtered = Path(tmp) / "papers.jsonl"
        n = 0
        with open(filtered, "w") as out:
            for name in sorted(glob.glob(args.input)):
                with gzip.open(name, "rt") if name.endswith(".gz") else open(name) as fh:
                    for line in fh:
                        if json.loads(line)["categories"].split()[0] in labels:
                            out.write(line)
                            n += 1
                            if args.limit and n >= args.limit:
                                break
                if args.limit and n >= args.limit:
                    break
        results = []
        env = {**os.environ, "ARXIV_FT_CACHE": str(Path(tmp) / "cache"), "HF_DATASETS_CACHE": str(Path(tmp) / "hf")}
        for variant in ("lists", "datasets-cold", "datasets-warm"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                str(filtered),
                str(Path(tmp) / "cache"),
                str(args.max_seq_tokens),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"{variant:>14}: {r['examples']:,} examples in {r['seconds']:.1f} s, peak RSS "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB (+{r['rss_growth_bytes'] / 2**30:.2f} GiB while tokenising)"
            )
    summary = {
        "input": args.input,
        "papers": n,
        "max_seq_tokens": args.max_seq_tokens,
        "results": results,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
