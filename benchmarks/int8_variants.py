"""Which linear layers int8 dynamic quantisation can take, and whether SmoothQuant-style scale migration rescues the
MLP's down projection: each variant's papers/s against the merged fp32 model and its agreement with it, on the same
papers, in one process (the table under "int8" in benchmarks/RESULTS.md).

    python benchmarks/int8_variants.py --run runs/default --alphas 0.5,0.8     # ~10 min on one core

Smoothing (Xiao et al. 2023, SmoothQuant): the down projection's input X = silu(gate(h)) * up(h) has outlier
channels that one activation scale per tensor rounds away. Per input channel j, s_j = max|X_j|^a / max|W_j|^(1-a)
(max|X_j| over calibration prompts: the first 32 shipped *training* papers, never the papers scored), the up
projection's output j divided by s_j and the down projection's column j multiplied by it: the same function in exact
arithmetic, with the outliers moved from the activations into the weights, which are quantised per channel.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arxiv_ft.classifier import Classifier  # noqa: E402
from arxiv_ft.modeling import quantize_linear_int8 as quantize  # noqa: E402
from arxiv_ft.records import read_records  # noqa: E402

ASSETS = ROOT / "arxiv_ft" / "assets"


@torch.no_grad()
def smooth_down_proj(model, prompts: list[list[int]], alpha: float):
    """SmoothQuant's migration for every Llama MLP (see the module docstring); returns the model, changed in place."""
    amax = {}
    mlps = {n: m for n, m in model.named_modules() if hasattr(m, "down_proj") and hasattr(m, "up_proj")}

    def record(name):
        def hook(_, args):
            a = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return hook

    hooks = [m.down_proj.register_forward_pre_hook(record(n)) for n, m in mlps.items()]
    for p in prompts:
        model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    for name, mlp in mlps.items():
        w = mlp.down_proj.weight.abs().amax(0)
        s = (amax[name].clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        mlp.up_proj.weight.div_(s[:, None])
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s)
        mlp.down_proj.weight.mul_(s[None, :])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/default", help="a train.py run folder")
    ap.add_argument("--per-class", type=int, default=5, help="validation papers a class (shipped sample)")
    ap.add_argument("--alphas", default="0.5,0.8", help="SmoothQuant migration strengths to try")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clf = Classifier.from_pretrained(args.run)
    by_class: dict[str, list] = {}
    for r in read_records(ASSETS / "cs-validation-sample.jsonl"):
        by_class.setdefault(r.primary, []).append(r)
    papers = [r for label in sorted(by_class) for r in by_class[label][: args.per_class]]
    calibration = [clf.builder.prompt_ids(r) for r in list(read_records(ASSETS / "cs-train-sample.jsonl"))[:32]]
    base = clf.model.merge_and_unload() if hasattr(clf.model, "merge_and_unload") else clf.model
    truth = [r.primary for r in papers]

    def timed(model):
        c = Classifier(model.eval(), clf.tokenizer, clf.builder, clf.head, clf.temperature)
        c.predict(papers[:8], top_k=1, batch_size=16)  # warm-up
        start = time.perf_counter()
        labels = [p["label"] if p else None for p in c.predict(papers, top_k=1, batch_size=16)]
        return labels, time.perf_counter() - start

    reference, seconds = timed(base)
    acc = lambda labels: sum(a == b for a, b in zip(labels, truth)) / len(truth)  # noqa: E731
    print(
        f"{len(papers)} validation papers, {args.threads} thread(s); merged fp32: accuracy {acc(reference):.1%}, "
        f"{len(papers) / seconds:.2f} papers/s"
    )
    variants = {
        "every linear layer, per-tensor": lambda m: quantize(m, (), per_channel=False),
        "every linear layer, per-channel": lambda m: quantize(m, ()),
        "but the head, per-channel": lambda m: quantize(m, ("lm_head",)),
        "but the head and the down projections (--quantize int8)": lambda m: quantize(m, ("lm_head", "down_proj")),
    }
    for a in (float(x) for x in args.alphas.split(",") if x):
        variants[f"but the head, down projections smoothed a={a}"] = lambda m, a=a: quantize(
            smooth_down_proj(m, calibration, a), ("lm_head",)
        )
    print("| int8 layers | papers/s vs merged fp32 | accuracy | same label as fp32 |\n|---|---:|---:|---:|")
    for name, make in variants.items():
        labels, s = timed(make(copy.deepcopy(base)))
        agree = sum(a == b for a, b in zip(labels, reference)) / len(reference)
        print(f"| {name} | {seconds / s:.2f}x | {acc(labels):.1%} | {agree:.1%} |", flush=True)


if __name__ == "__main__":
    main()
