"""Classifying papers: label scoring vs batched greedy generate() vs the tutorial's one-paper-at-a-time generate().

    python benchmarks/bench_infer.py --per-class 3 --out benchmarks/results/infer-cpu.json      # 63 papers, base model
    python benchmarks/bench_infer.py --model-dir runs/default                                   # a train.py output
    python benchmarks/bench_infer.py --random-llama-1b --per-class 10 --batch-size 64            # a GPU

All three go through one `arxiv_ft.classifier.Classifier` (the object infer.py and train.py's evaluation use), on
the same papers (`--per-class` of each label from the validation sample), prompt and model: `score` =
`Classifier.predict` (length-sorted batches, the shared prefix once per batch, every label from one forward of the
label trie); `score_merged` = the same with a LoRA adapter merged into its fp32 base; `score_int8` = the same on
int8 dynamic quantisation of every linear layer (`infer.py --quantize int8`, CPU); `generate` = `Classifier.generate`
(batched greedy, left padding, parsed); `loop` = the same generate one paper at a time (what the tutorial does).
Prompt building is inside every timing. Every method's answers are compared paper by paper with `score`'s
(agreement, and the accuracy difference with a 95% bootstrap interval over the papers).

MFU of scoring counts model FLOPs per paper: 2 x (non-embedding parameters) per prompt token and per label-trie token,
2 x hidden x vocab for each position whose logits are computed (1 + trie tokens), and attention 4 x layers x
(heads x head_dim) per (query, key) pair (QK^T and AV). The whole prompt is counted for every paper; the shared
prefix really runs once per batch, so the FLOPs executed are fewer than those counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from arxiv_ft.classifier import Classifier
from arxiv_ft.modeling import count_parameters, set_cpu_threads

METHODS = ("score", "score_merged", "score_int8", "generate", "loop")


def load(args) -> Classifier:
    """A train.py output folder with its own labels and prompt, or a base model with the default ones."""
    if args.model_dir:
        return Classifier.from_pretrained(args.model_dir, dtype=args.dtype)
    from arxiv_ft.prompts import PromptSpec
    from arxiv_ft.records import read_labels

    labels = read_labels(common.ASSETS / "cs-labels.txt")
    return Classifier.zero_shot(args.model, labels, PromptSpec(max_seq_tokens=args.max_seq_tokens), dtype=args.dtype)


def scoring_flops(clf: Classifier, prompt_lengths: list[int]) -> float:
    """Model FLOPs of scoring these prompts (see the module docstring for what is counted)."""
    cfg = clf.model.config
    d, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)
    embeddings = vocab * d * (1 if cfg.tie_word_embeddings else 2)
    body = count_parameters(clf.model)[1] - embeddings
    depths = clf.scorer.tree.depths.tolist()
    total = 0.0
    for t in prompt_lengths:
        pairs = t * (t + 1) / 2 + sum(t + k + 1 for k in depths)  # causal prompt, then each trie node
        total += 2 * body * (t + len(depths)) + 2 * d * vocab * (1 + len(depths)) + 4 * layers * attn * pairs
    return total


def executed_token_fraction(prompt_lengths: list[int], n_prefix: int, n_nodes: int, batch_size: int) -> float:
    """Tokens the model really runs (prefix once a batch, padding included) over the tokens counted in the FLOPs."""
    lengths = sorted(prompt_lengths)
    chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    executed = sum(n_prefix + len(c) * (max(c) - n_prefix + n_nodes) for c in chunks)
    return executed / sum(t + n_nodes for t in lengths)


def accuracy(records, predicted: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and unparsed answers by the project's metric (None where `evaluate` is missing)."""
    try:
        from arxiv_ft.metrics import classification_metrics

        m = classification_metrics([r.primary for r in records], predicted, labels)
    except ImportError as exc:
        print(f"accuracy not computed: {exc}", file=sys.stderr)
        return {"accuracy": None, "macro_f1": None, "unparsed": sum(p is None for p in predicted)}
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "unparsed": m["unparsed"]}


def variant(clf: Classifier, method: str) -> Classifier:
    """`clf` itself, or a copy of it with the adapter merged (`score_merged`) or int8-quantised (`score_int8`)."""
    if method not in ("score_merged", "score_int8"):
        return clf
    import copy

    from arxiv_ft.modeling import quantize_int8

    model = copy.deepcopy(clf.model)
    if method == "score_int8":
        model = quantize_int8(model, clf.model.device, clf.model.dtype)
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return Classifier(model.eval(), clf.tokenizer, clf.builder, clf.head, clf.temperature)


def paired_difference(records, predicted: list, reference: list) -> dict:
    """Agreement with the reference method and accuracy(predicted) - accuracy(reference) on the same papers, with a
    95% bootstrap interval over the papers."""
    from arxiv_ft.stats import bootstrap_mean

    truth = [r.primary for r in records]
    diff = bootstrap_mean([(p == t) - (q == t) for p, q, t in zip(predicted, reference, truth)])
    agree = sum(p == q for p, q in zip(predicted, reference)) / len(predicted)
    return {"agreement_with_score": agree, "accuracy_minus_score": diff["value"], "ci95": list(diff["ci95"])}


def measure(clf: Classifier, records, args, methods, deadline: common.Deadline | None = None) -> dict:
    """Time each method on `records` (after untimed warm-up runs): papers/s, accuracy, peak memory (reset before
    each timed run; CUDA: allocated, CPU: RSS) and scoring's model FLOPs.

    A method that would start after `deadline` is reported as skipped."""
    from arxiv_ft.metrics import peak_flops, peak_memory_bytes

    device, bs = clf.model.device, args.batch_size
    runs = {
        "score": lambda c, rs: [p["label"] if p else None for p in c.predict(rs, top_k=1, batch_size=bs)],
        "generate": lambda c, rs: [g[1] if g else None for g in c.generate(rs, bs, args.max_new_tokens)],
        "loop": lambda c, rs: [g[1] if g else None for r in rs for g in c.generate([r], 1, args.max_new_tokens)],
    }
    runs["score_merged"] = runs["score_int8"] = runs["score"]
    results, answers = {}, {}
    for method in methods:
        if deadline is not None and deadline.left() < 5:
            results[method] = {"status": f"skipped: time budget spent ({deadline.left():.0f} s left)"}
            continue
        if method == "score_int8" and (torch.device(device).type != "cpu" or clf.model.dtype != torch.float32):
            results[method] = {"status": "skipped: int8 is a CPU path for fp32 weights"}
            continue
        run, c = runs[method], variant(clf, method)
        with torch.no_grad():
            for _ in range(args.warmup):
                run(c, records[: 1 if method == "loop" else bs])
            common.reset_peak_memory(device)
            started = time.perf_counter()
            predicted = run(c, records)
            common.sync(device)
            seconds = time.perf_counter() - started
        results[method] = {"status": "ok", "papers": len(records), "seconds": seconds}
        results[method]["peak_memory_bytes"] = peak_memory_bytes(device)
        results[method].update(papers_per_s=len(records) / seconds, **accuracy(records, predicted, clf.labels))
        answers[method] = predicted
        if "score" in answers:
            results[method].update(paired_difference(records, predicted, answers["score"]))
        print(f"{method}: {seconds:.2f} s, {len(records) / seconds:.2f} papers/s", file=sys.stderr, flush=True)
    if results.get("score", {}).get("status") == "ok":
        prompt_lengths = [len(p) for p in clf.prompts(records) if p is not None]
        flops, s = scoring_flops(clf, prompt_lengths), results["score"]
        s.update(model_flops=flops, achieved_tflops=flops / s["seconds"] / 1e12, prompt_tokens=sum(prompt_lengths))
        n_prefix, n_nodes = len(clf.scorer.prefix), len(clf.scorer.tree.tokens)
        s["executed_token_fraction"] = executed_token_fraction(prompt_lengths, n_prefix, n_nodes, bs)
        peak = args.peak_tflops * 1e12 or peak_flops(device, clf.model.dtype)
        s["mfu"] = flops / s["seconds"] / peak if peak else None
    score = results.get("score", {}).get("papers_per_s")
    for r in results.values():
        if r["status"] == "ok" and score:
            r["scoring_speedup"] = score / r["papers_per_s"]
    return results


def report(args, results: dict, machine: dict) -> None:
    header = "method papers seconds papers/s x_score accuracy acc_minus_score_ci95 agree unparsed TFLOP/s MFU".split()
    rows = []
    for method, r in results.items():
        if r["status"] != "ok":
            rows.append([method, *["—"] * (len(header) - 1)])
            continue
        ratio = r.get("scoring_speedup") and 1 / r["scoring_speedup"]
        row = [method, str(r["papers"]), f"{r['seconds']:.2f}", f"{r['papers_per_s']:.2f}", common.fmt(ratio, ".2fx")]
        ci = r.get("ci95")
        diff = ci and f"{100 * r['accuracy_minus_score']:+.1f} pp [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
        row += [common.fmt(r["accuracy"], ".3f"), diff or "—", common.fmt(r.get("agreement_with_score"), ".3f")]
        mfu = r.get("mfu") and 100 * r["mfu"]
        row += [str(r["unparsed"]), common.fmt(r.get("achieved_tflops"), ".4f"), common.fmt(mfu, ".1f%")]
        rows.append(row)
    model = args.model_dir or common.describe_model(args)
    print(f"\nmodel {model}, batch {args.batch_size}, {machine['device']}, max_new_tokens {args.max_new_tokens}\n")
    print(common.markdown_table(header, rows, right=set(range(1, len(header)))))
    common.write_json({"args": vars(args), "machine": machine, "results": results}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--model-dir", help="a train.py output folder (its labels, prompt and adapter/model)")
    parser.add_argument("--per-class", type=int, default=3, help="validation papers per label (3 x 21 = 63)")
    parser.add_argument("--batch-size", type=int, default=16, help="papers per batch (train.py's eval batch size)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generation budget (generate_labels' default)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs of each method on a few papers")
    args = parser.parse_args()
    from transformers.utils import logging

    set_cpu_threads(args.threads)
    logging.set_verbosity_error()  # generate() warns about unused generation flags on every call
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        described = common.describe_model(args)
        args.model = common.model_path(args, Path(tmp))
        clf = load(args)
        args.model, args.random_llama_1b, args.random_weights = described, False, False
    records = common.sample_records(common.ASSETS / "cs-validation-sample.jsonl", clf.labels, args.per_class, 0)
    machine = common.machine_info(clf.model.device)
    print(f"machine: {machine}\n{len(records)} papers, {len(clf.labels)} labels", file=sys.stderr)
    results = measure(clf, records, args, args.methods.split(","))
    machine["load_average_after"] = list(os.getloadavg())
    report(args, results, machine)


if __name__ == "__main__":
    main()
