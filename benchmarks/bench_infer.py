"""Classifying papers: label scoring vs batched greedy generate() vs the tutorial's one-paper-at-a-time generate().

    python benchmarks/bench_infer.py --per-class 3 --out benchmarks/results/infer-cpu.json      # 63 papers, base model
    python benchmarks/bench_infer.py --model-dir runs/default                                   # a train.py output
    python benchmarks/bench_infer.py --device cuda --per-class 10 --batch-size 64

The same papers (`--per-class` of each label from the validation sample), the same prompt and the same model for all
three: `score` = LabelScorer (shared prefix once per batch, every label from one forward of the label trie,
length-sorted batches); `generate` = generate_labels (batched greedy, left padding, parsed); `loop` = one paper at a
time with model.generate() (what the tutorial does). Prompt building is inside every timing.

MFU of scoring counts model FLOPs per paper: 2 x (non-embedding parameters) per prompt token and per label-trie token,
2 x hidden x vocab for each position whose logits are computed (1 + trie tokens), and attention 4 x layers x
(heads x head_dim) per (query, key) pair (QK^T and AV). The whole prompt is counted for every paper; the shared
prefix really runs once per batch, so the FLOPs executed are fewer than those counted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common
import torch

from arxiv_ft import records as rec
from arxiv_ft.metrics import classification_metrics
from arxiv_ft.modeling import count_parameters, load_tokenizer, load_trained
from arxiv_ft.scoring import LabelScorer, generate_labels, parse_generated

METHODS = ("score", "generate", "loop")


def load(args, dtype):
    """(model, tokenizer, builder): a train.py output folder with its own labels and prompt, or a base model."""
    if not args.model_dir:
        model = common.build_model(args, dtype)
        tokenizer, builder = common.load_builder(args.model, args.max_seq_tokens)
        return model.eval(), tokenizer, builder
    folder = Path(args.model_dir)
    prompt = json.loads((folder / "prompt.json").read_text())
    labels = rec.read_labels(folder / "labels.txt")
    model = load_trained(folder, dtype).to(args.device).eval()
    _, builder = common.load_builder(str(folder), prompt["max_seq_tokens"], labels, prompt["template"])
    return model, load_tokenizer(str(folder)), builder


def generate_one_at_a_time(model, tokenizer, builder, records, max_new_tokens: int) -> list[str | None]:
    """The tutorial's loop: build the prompt, generate greedily for one paper, parse the text."""
    parsed = []
    for record in records:
        ids = torch.tensor([builder.prompt_ids(record)], device=model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        parsed.append(
            parse_generated(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), builder.labels)
        )
    return parsed


def scoring_flops(model, scorer: LabelScorer, prompt_lengths: list[int]) -> float:
    """Model FLOPs of scoring these prompts (see the module docstring for what is counted)."""
    cfg = model.config
    d, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    attn = cfg.num_attention_heads * getattr(cfg, "head_dim", d // cfg.num_attention_heads)
    embeddings = vocab * d * (1 if cfg.tie_word_embeddings else 2)
    body = count_parameters(model)[1] - embeddings
    depths = scorer.tree.depths.tolist()
    total = 0.0
    for t in prompt_lengths:
        pairs = t * (t + 1) / 2 + sum(t + k + 1 for k in depths)  # causal prompt, then each trie node
        total += 2 * body * (t + len(depths)) + 2 * d * vocab * (1 + len(depths)) + 4 * layers * attn * pairs
    return total


def executed_token_fraction(prompt_lengths: list[int], n_prefix: int, scorer: LabelScorer, args) -> float:
    """Tokens the model really runs (prefix once a batch, padding included) over the tokens counted in the FLOPs."""
    lengths, n_nodes = sorted(prompt_lengths), len(scorer.tree.tokens)
    chunks = [lengths[i : i + args.batch_size] for i in range(0, len(lengths), args.batch_size)]
    executed = sum(n_prefix + len(c) * (max(c) - n_prefix + n_nodes) for c in chunks)
    return executed / sum(t + n_nodes for t in lengths)


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
    common.set_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()  # generate() warns about unused generation flags on every call
    dtype = common.resolve_dtype(args.dtype, args.device)
    model, tokenizer, builder = load(args, dtype)
    records = common.sample_records(common.ASSETS / "cs-validation-sample.jsonl", builder.labels, args.per_class, 0)
    scorer = LabelScorer(model, builder, tokenizer.pad_token_id)
    bs = args.batch_size
    runs = {
        "score": lambda rs: [p.predicted if p else None for p in scorer.predict(rs, bs)],
        "generate": lambda rs: [
            g[1] if g else None for g in generate_labels(model, tokenizer, builder, rs, bs, args.max_new_tokens)
        ],
        "loop": lambda rs: generate_one_at_a_time(model, tokenizer, builder, rs, args.max_new_tokens),
    }
    machine = common.machine_info(args.device)
    print(f"machine: {machine}\n{len(records)} papers, {len(builder.labels)} labels, batch {bs}")
    results = {}
    for method in args.methods.split(","):
        with torch.no_grad():
            for _ in range(args.warmup):
                runs[method](records[: 1 if method == "loop" else bs])
            common.sync(args.device)
            started = time.perf_counter()
            predicted = runs[method](records)
            common.sync(args.device)
            seconds = time.perf_counter() - started
        m = classification_metrics([r.primary for r in records], predicted, builder.labels)
        results[method] = {"papers": len(records), "seconds": seconds, "papers_per_s": len(records) / seconds}
        results[method].update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], unparsed=m["unparsed"])
        print(f"{method}: {seconds:.1f} s, accuracy {m['accuracy']:.3f}", flush=True)
    machine["load_average_after"] = list(os.getloadavg())
    if "score" in results:
        prompt_lengths = [len(builder.prompt_ids(r)) for r in records]
        flops = scoring_flops(model, scorer, prompt_lengths)
        s = results["score"]
        s.update(model_flops=flops, achieved_tflops=flops / s["seconds"] / 1e12, prompt_tokens=sum(prompt_lengths))
        s["executed_token_fraction"] = executed_token_fraction(prompt_lengths, len(scorer.prefix), scorer, args)
        peak = common.peak_flops(args.device, dtype, args.peak_tflops)
        s["mfu"] = flops / s["seconds"] / peak if peak else None
    report(args, results, machine)


def report(args, results: dict, machine: dict) -> None:
    score = results.get("score", {}).get("papers_per_s")
    header = "method papers seconds papers/s accuracy unparsed scoring_speedup TFLOP/s MFU".split()
    rows = []
    for method, r in results.items():
        r["scoring_speedup"] = score / r["papers_per_s"] if score else None
        row = [method, str(r["papers"]), f"{r['seconds']:.2f}", f"{r['papers_per_s']:.2f}", f"{r['accuracy']:.3f}"]
        row += [str(r["unparsed"]), common.fmt(r["scoring_speedup"], ".2fx")]
        mfu = r.get("mfu") and 100 * r["mfu"]
        row += [common.fmt(r.get("achieved_tflops"), ".4f"), common.fmt(mfu, ".1f%")]
        rows.append(row)
    model = args.model_dir or common.describe_model(args)
    print(f"\nmodel {model}, batch {args.batch_size}, {args.device}, max_new_tokens {args.max_new_tokens}")
    common.print_table(header, rows)
    for other in ("generate", "loop"):
        if score and other in results:
            print(f"scoring vs {other}: {results[other]['scoring_speedup']:.2f}x papers/s")
    common.write_json({"args": vars(args), "machine": machine, "results": results}, args.out)


if __name__ == "__main__":
    main()
