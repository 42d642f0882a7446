"""The cs model on arXiv as it comes: a date-ordered slice of the shared dump (every archive, the real class mix),
papers outside the label set, abstention, calibration and the int8 scorer (docs/results/whole-arxiv/).

    python tools/whole_arxiv.py slice --dump '../shared/data/arxiv/dump/*.jsonl.gz' --start 2026-07-01 --n 1500 \
        --out runs/whole/slice.jsonl
    arxiv-ft infer --model-dir RUN --input runs/whole/slice.jsonl --output runs/whole/fp32.jsonl --top-k 21 \
        --temperature 1
    arxiv-ft infer ... --quantize int8 --output runs/whole/int8.jsonl
    arxiv-ft infer --model-dir RUN --input arxiv_ft/assets/cs-test-sample.jsonl --output runs/whole/test.jsonl \
        --top-k 21 --temperature 1
    python tools/whole_arxiv.py analyse --run RUN --slice runs/whole/fp32.jsonl --int8 runs/whole/int8.jsonl \
        --test runs/whole/test.jsonl --out docs/results/whole-arxiv

Rows are scored at T = 1 with every label's probability, so the analysis can apply the run's fitted temperature
(calibration.json, fitted on validation papers) itself and compare before and after on the same rows.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arxiv_ft import calibration as cal  # noqa: E402
from arxiv_ft.options import ASSETS  # noqa: E402


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def shipped_ids() -> set[str]:
    """Papers this project ships (training, validation, test samples): never part of the slice."""
    names = ("cs-train-sample.jsonl", "cs-validation-sample.jsonl", "cs-test-sample.jsonl")
    return {r["id"] for name in names for r in read_jsonl(ASSETS / name)}


def make_slice(args) -> None:
    """The first --n papers listed on or after --start, in the dump's (date) order, minus shipped papers."""
    skip, kept, skipped = shipped_ids(), [], 0
    for path in sorted(glob.glob(args.dump)):
        for paper in read_jsonl(path):
            if paper["update_date"] < args.start:
                continue
            if paper["id"] in skip:
                skipped += 1
                continue
            kept.append({k: paper[k] for k in ("id", "title", "abstract", "categories", "update_date")})
            if len(kept) == args.n:
                break
        if len(kept) == args.n:
            break
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept), encoding="utf-8")
    primaries = Counter(p["categories"].split()[0] for p in kept)
    print(
        f"{len(kept)} papers listed {kept[0]['update_date']} .. {kept[-1]['update_date']} -> {args.out}; "
        f"{skipped} shipped papers left out; {len(primaries)} primary categories"
    )


# --------------------------------------------------------------------------------------------------- analyse


def probs_at(row: dict, labels: list[str], temperature: float) -> list[float]:
    """Every label's probability at `temperature`, from a row scored at T = 1 with top_k = all labels."""
    p = dict(row["top_k"])
    logs = [math.log(max(p[label], 1e-12)) / temperature for label in labels]
    top = max(logs)
    z = sum(math.exp(x - top) for x in logs)
    return [math.exp(x - top) / z for x in logs]


def calibration_figures(rows: list[dict], labels: list[str], temperature: float) -> dict:
    import torch

    rows = [r for r in rows if r["true_in_label_set"]]
    y = torch.tensor([labels.index(r["true"]) for r in rows])
    before = torch.tensor([probs_at(r, labels, 1.0) for r in rows], dtype=torch.float64)
    after = torch.tensor([probs_at(r, labels, temperature) for r in rows], dtype=torch.float64)
    return {
        "n": len(rows),
        "ece_before": cal.expected_calibration_error(before, y),
        "ece_after": cal.expected_calibration_error(after, y),
        "nll_before": cal.nll(before.log(), y, 1.0),
        "nll_after": cal.nll(after.log(), y, 1.0),
        "mean_confidence_before": float(before.max(-1).values.mean()),
        "mean_confidence_after": float(after.max(-1).values.mean()),
        "accuracy": float((before.argmax(-1) == y).double().mean()),
    }


def ood_figures(rows: list[dict], labels: list[str], temperature: float) -> dict:
    """In-set vs out-of-set AUROC for each score (higher = more in-set), and the risk-coverage curve over all papers
    (an out-of-set paper kept counts as wrong: the model cannot name its category)."""
    inside = [r for r in rows if r["true_in_label_set"]]
    outside = [r for r in rows if r["true_in_label_set"] is False]
    confidence = {id(r): max(probs_at(r, labels, temperature)) for r in rows}
    scores = {
        "confidence": lambda r: confidence[id(r)],
        "label_mass": lambda r: r["label_mass"],
    }
    result = {"n_in_set": len(inside), "n_out_of_set": len(outside), "auroc": {}}
    for name, score in scores.items():
        result["auroc"][name] = cal.auroc([score(r) for r in inside], [score(r) for r in outside])
    correct = [bool(r["true_in_label_set"]) and r["top_k"][0][0] == r["true"] for r in rows]
    result["risk_coverage"] = {
        name: cal.risk_coverage([score(r) for r in rows], correct, points=20) for name, score in scores.items()
    }
    return result


def mix_figures(rows: list[dict], labels: list[str]) -> dict:
    """The natural mix: accuracy, macro-F1 and per-class recall on the in-set papers, by class size."""
    from arxiv_ft.metrics import classification_metrics

    inside = [r for r in rows if r["true_in_label_set"]]
    m = classification_metrics([r["true"] for r in inside], [r["top_k"][0][0] for r in inside], labels)
    counts = Counter(r["true"] for r in inside)
    recall = {
        label: sum(r["top_k"][0][0] == label for r in inside if r["true"] == label) / counts[label]
        for label in labels
        if counts[label]
    }
    outside = Counter(r["true"] for r in rows if r["true_in_label_set"] is False)
    archives = Counter(t.split(".")[0] if "." in t else t.split("-")[0] for t in outside.elements())
    return {
        "n": len(rows),
        "n_in_set": len(inside),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "class_counts": dict(counts.most_common()),
        "recall": recall,
        "out_of_set_by_archive": dict(archives.most_common()),
        "out_of_set_cs": {k: v for k, v in outside.most_common() if k.startswith("cs.")},
    }


def int8_figures(fp32: list[dict], int8: list[dict], fp32_summary: dict, int8_summary: dict) -> dict:
    assert [r["id"] for r in fp32] == [r["id"] for r in int8]
    inside = [(a, b) for a, b in zip(fp32, int8) if a["true_in_label_set"]]
    pairs = [({lab: q for lab, q in a["top_k"]}, {lab: q for lab, q in b["top_k"]}) for a, b in zip(fp32, int8)]
    speed = [s["this_run"]["papers_per_second"] for s in (fp32_summary, int8_summary)]
    from arxiv_ft.stats import bootstrap_mean

    diff = bootstrap_mean([(b["top_k"][0][0] == b["true"]) - (a["top_k"][0][0] == a["true"]) for a, b in inside])
    return {
        "accuracy_int8_minus_fp32": {"value": diff["value"], "ci95": list(diff["ci95"])},
        "n": len(fp32),
        "n_in_set": len(inside),
        "accuracy_fp32": sum(a["top_k"][0][0] == a["true"] for a, _ in inside) / len(inside),
        "accuracy_int8": sum(b["top_k"][0][0] == b["true"] for _, b in inside) / len(inside),
        "same_label": sum(a["top_k"][0][0] == b["top_k"][0][0] for a, b in zip(fp32, int8)) / len(fp32),
        "max_prob_difference": max(max(abs(pa[k] - pb[k]) for k in pa) for pa, pb in pairs),
        "papers_per_second_fp32": speed[0],
        "papers_per_second_int8": speed[1],
        "speedup": speed[1] / speed[0],
    }


def tfidf_figures(run: Path, slice_input: str, rows: list[dict], labels: list[str]) -> dict:
    """The tuned TF-IDF baseline (word + char n-grams, C by cross-validation) fitted on the run's own training papers,
    reading the LLM's text and the full abstract, scored on the slice's in-set papers; the model minus each, paired
    over those papers with a 95% bootstrap interval."""
    from arxiv_ft import baseline
    from arxiv_ft.config import config_from_dict
    from arxiv_ft.options import TrainConfig
    from arxiv_ft.records import parse_record
    from arxiv_ft.rundir import RunDir
    from arxiv_ft.sources import load_papers, to_records
    from arxiv_ft.stats import bootstrap_mean

    _, train, _ = load_papers(config_from_dict(TrainConfig, RunDir(run).config()))
    papers = {p["id"]: parse_record(p) for p in read_jsonl(slice_input)}
    inside = [r for r in rows if r["true_in_label_set"]]
    records = [papers[r["id"]] for r in inside]
    model = [int(r["top_k"][0][0] == r["true"]) for r in inside]
    out = {"n_train": len(train), "model_accuracy": sum(model) / len(model)}
    for row in ("tuned_llm_text", "tuned_full_text"):
        which, args = baseline.TFIDF_ROWS[row]
        text = baseline.llm_text(run) if which == "llm" else baseline.paper_text
        m = baseline.fit_and_score(to_records(train), records, labels, text, **args)
        diff = bootstrap_mean([a - b for a, b in zip(model, m["correct"])])
        out[row] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "c": m["c"]}
        out[row]["model_minus_tfidf"] = {"value": diff["value"], "ci95": list(diff["ci95"])}
    return out


def plot(result: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, curve in result["slice"]["ood"]["risk_coverage"].items():
        ax.plot([p["coverage"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("coverage (fraction of the slice's papers answered)")
    ax.set_ylabel("accuracy of the answered papers, %\n(a paper outside the label set counts as wrong)")
    ax.set_title(f"Risk-coverage: {title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="abstain below")
    fig.tight_layout()
    fig.savefig(out / "risk_coverage.png", dpi=120)


def analyse(args) -> None:
    run = Path(args.run)
    labels = [x.strip() for x in (run / "labels.txt").read_text().splitlines() if x.strip()]
    temperature = json.loads((run / "calibration.json").read_text())["temperature"]
    rows = read_jsonl(args.slice)
    summary = json.loads(Path(args.slice + ".summary.json").read_text())
    result = {
        "selected_on": json.loads((run / "calibration.json").read_text())["selected_on"],  # where T was fitted
        "temperature": temperature,
        "slice": {
            "input": summary["n_items"],
            "scored": summary["n_predicted"],
            "rejected": summary["n_rejected"],
            "papers_per_second": summary["this_run"]["papers_per_second"],
            "mix": mix_figures(rows, labels),
            "ood": ood_figures(rows, labels, temperature),
            "calibration": calibration_figures(rows, labels, temperature),
        },
    }
    if args.tfidf:
        result["slice"]["tfidf"] = tfidf_figures(run, args.tfidf, rows, labels)
    if args.test:
        result["test_calibration"] = calibration_figures(read_jsonl(args.test), labels, temperature)
    if args.int8:
        int8_summary = json.loads(Path(args.int8 + ".summary.json").read_text())
        result["int8"] = int8_figures(rows, read_jsonl(args.int8), summary, int8_summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out, args.title)
    print(json.dumps({k: v for k, v in result.items() if k != "slice"}, indent=1))
    s = result["slice"]
    print(json.dumps({k: s[k] for k in ("input", "scored", "rejected", "papers_per_second")}))
    print(json.dumps(s["ood"]["auroc"]), json.dumps(s["calibration"]))
    print(json.dumps({k: v for k, v in s["mix"].items() if k != "recall"}))
    print(json.dumps(s.get("tfidf")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("slice")
    p.add_argument("--dump", default=str(ROOT.parent / "shared/data/arxiv/dump/*.jsonl.gz"))
    p.add_argument("--start", default="2026-07-01")
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--out", required=True)
    p = sub.add_parser("analyse")
    p.add_argument("--run", required=True)
    p.add_argument("--slice", required=True)
    p.add_argument("--int8", default="")
    p.add_argument("--test", default="")
    p.add_argument("--tfidf", default="", help="the slice's input papers: fit and score the tuned TF-IDF baseline")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="a date-ordered dump slice", help="what the scored papers are (the plot's title)")
    args = parser.parse_args()
    make_slice(args) if args.command == "slice" else analyse(args)


if __name__ == "__main__":
    main()
