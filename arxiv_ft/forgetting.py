"""Forgetting probes: what fine-tuning costs the model outside the task, measured the same way before and after.

Three probes, all on shipped data so every run is measured on identical items:
- perplexity on WikiText-2 (raw test): the text is tokenised once and `n_windows` windows of `window_tokens` are
  taken evenly spaced over all of it (the first N windows were one and a half articles); each window is scored on
  its own (its first token has no context and is not scored).
- multiple-choice accuracy on a fixed mix (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, MMLU), lm-eval-harness style:
  plain-text context, each choice scored by log-likelihood; no chat template, so the base model is not penalised.
- the mean KL(base || tuned) of next-token distributions on the perplexity windows (for adapters the base is the
  same model with its adapters off): the most sensitive of the three, and it needs no labels.
Every delta carries a 95% paired bootstrap interval over the windows or the items (`arxiv_ft.stats`).

The base model's results are cached on disk (`base_probes_cached`), keyed by model identity, PROBE_VERSION and the
probe config, so each fine-tuned run pays only for probing itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from arxiv_ft.config import option
from arxiv_ft.data import left_pad
from arxiv_ft.fileio import cached_json, file_digest, json_digest
from arxiv_ft.options import ASSETS

# Bump when anything that changes the numbers changes: templates, tokenisation, window rule, item selection.
PROBE_VERSION = 2  # 2: windows spread over the whole text, per-window NLL kept for intervals


@dataclass(frozen=True)
class ProbeConfig:
    # Train's defaults are set in TrainConfig (the cheap probe); the comparisons use 64 windows and all 800 items.
    n_windows: int = option(16, "WikiText-2 windows scored, evenly spaced over the whole text")
    window_tokens: int = option(512, "tokens per perplexity window")
    mc_items: int = option(70, "multiple-choice items: the first mc_items/7 of each task in file order")
    batch_size: int = option(8, "choice sequences per forward")
    windows_per_forward: int = option(1, "perplexity windows per forward (logits: window x 49k vocab x 4 bytes each)")
    kl: bool = option(True, "also measure KL(base || tuned) on the windows (needs the base model at hand)")
    text_file: str = option(str(ASSETS / "wikitext2_raw_test.txt"), "perplexity text")
    items_file: str = option(str(ASSETS / "probe_mix_800.jsonl"), "multiple-choice items (JSONL)")

    def __post_init__(self):
        for name in ("n_windows", "window_tokens", "mc_items", "batch_size", "windows_per_forward"):
            if getattr(self, name) < (2 if name == "window_tokens" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- perplexity


_TOKEN_CACHE: dict[tuple, list[int]] = {}


def _text_ids(tokenizer, text: str) -> list[int]:
    # Tokenising all of WikiText-2 costs ~2 s; base and tuned probes in one process share the result.
    key = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), hashlib.sha1(text.encode()).hexdigest())
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return _TOKEN_CACHE[key]


def window_starts(n_tokens: int, window_tokens: int, n_windows: int) -> list[int]:
    """Where each of `n_windows` non-overlapping windows starts: evenly spaced over the whole token stream, so the
    probe reads many articles instead of the first one or two."""
    if n_tokens < window_tokens * n_windows:
        raise ValueError(f"text has {n_tokens} tokens, fewer than {n_windows} windows of {window_tokens}")
    stride = n_tokens // n_windows
    return [i * stride for i in range(n_windows)]


def text_windows(tokenizer, text: str, window_tokens: int, n_windows: int) -> torch.Tensor:
    """`n_windows` non-overlapping windows of the whole text's token ids (see window_starts): [n, window_tokens]."""
    ids = _text_ids(tokenizer, text)
    starts = window_starts(len(ids), window_tokens, n_windows)
    return torch.tensor([ids[s : s + window_tokens] for s in starts], dtype=torch.long)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(model):
    # Probes must not see dropout (LoRA dropout included); restore whatever mode training left the model in.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


_NO_BASE = object()  # window_scores without KL


def window_scores(model, windows: torch.Tensor, batch_size: int = 1, base_model=_NO_BASE, progress: bool = False):
    """Per window: the summed NLL of its predicted tokens, and (unless `base_model` is _NO_BASE) the summed
    KL(base || tuned) over its positions, from the same forward of `model`: KL costs one base forward more, not two.

    `base_model=None` means `model` is a PEFT model whose adapters, switched off, are the base.
    """
    device = _device(model)
    want_kl = base_model is not _NO_BASE

    def base_logits(ids):
        if base_model is None:
            with model.disable_adapter():
                return model(input_ids=ids).logits
        return base_model(input_ids=ids).logits

    window_nll: list[float] = []
    window_kl: list[float] | None = [] if want_kl else None
    reference = base_model if want_kl and base_model is not None else model
    with _inference(model), _inference(reference):
        # A few windows per forward: the logits of one 1024-token window are 200 MB with a 49k vocabulary.
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc="probe: perplexity", unit="window", disable=not progress, leave=False):
            ids = windows[start : start + batch_size].to(device)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            window_nll.extend(float(x) for x in nll.double().sum(dim=1))
            if want_kl:
                base_logp = torch.log_softmax(base_logits(ids)[:, :-1].float(), dim=-1)
                # kl_div(input=log q, target=log p) is sum p (log p - log q): KL(base || tuned).
                kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(dim=(1, 2))
                window_kl.extend(float(x) for x in kl.double())
    return window_nll, window_kl


def _perplexity_record(window_nll: list[float], window_tokens: int) -> dict:
    n_tokens = len(window_nll) * (window_tokens - 1)
    nll_mean = sum(window_nll) / n_tokens
    return {
        "ppl": float(torch.tensor(nll_mean, dtype=torch.float64).exp()),
        "nll": nll_mean,
        "tokens": n_tokens,
        "windows": len(window_nll),
        "window_tokens": window_tokens,
        "window_nll": window_nll,  # summed NLL of each window's predicted tokens: what the intervals resample
    }


def _kl_record(window_kl: list[float], window_tokens: int) -> dict:
    n_positions = len(window_kl) * (window_tokens - 1)
    return {"kl": sum(window_kl) / n_positions, "positions": n_positions, "window_kl": window_kl}


def perplexity(
    model,
    tokenizer,
    text: str,
    window_tokens: int = 1024,
    n_windows: int = 8,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity on fixed windows of `text`: exp of the mean NLL over every predicted token of every window."""
    windows = text_windows(tokenizer, text, window_tokens, n_windows)
    window_nll, _ = window_scores(model, windows, batch_size, progress=progress)
    return _perplexity_record(window_nll, window_tokens)


def next_token_kl(
    base_model, tuned_model, tokenizer, text: str, window_tokens: int = 1024, n_windows: int = 8, batch_size: int = 1
) -> dict:
    """Mean KL(base || tuned) of next-token distributions over the perplexity windows' predicting positions.

    `base_model=None` means `tuned_model` is a PEFT model whose adapters, switched off, are the base.
    """
    windows = text_windows(tokenizer, text, window_tokens, n_windows)
    _, window_kl = window_scores(tuned_model, windows, batch_size, base_model)
    return _kl_record(window_kl, window_tokens)


# ------------------------------------------------------------------------------------------ multiple choice


def read_items(path: str | Path) -> list[dict]:
    """Multiple-choice items of a JSONL file, in file order."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def select_items(items: list[dict], n: int) -> list[dict]:
    """The first items of each task in turn (round robin, file order): `n` items, every task represented.

    The probe file is sorted by task, so its first `n` lines alone would all be ARC-Easy.
    """
    by_task: dict[str, list[dict]] = {}
    for item in items:
        by_task.setdefault(item["task"], []).append(item)
    queues = [iter(v) for v in by_task.values()]
    out: list[dict] = []
    while len(out) < n and queues:
        for queue in list(queues):
            item = next(queue, None)
            if item is None:
                queues.remove(queue)
            elif len(out) < n:
                out.append(item)
    return out


def mc_requests(item: dict) -> list[tuple[str, str]]:
    """(context, continuation) text for each choice, lm-eval-harness style; the continuation is what is scored.

    WinoGrande uses partial scoring: each context option (sentence up to the blank, filled in) is scored by the
    likelihood of the shared rest of the sentence. HellaSwag continues the passage; BoolQ's question already holds
    its passage; everything else is `Question: ...\\nAnswer:` + ` choice`.
    """
    if "context_options" in item:
        return [(ctx, " " + item["continuation"].strip()) for ctx in item["context_options"]]
    # Choices are stripped: some PIQA solutions end in a stray space, which would be scored as a token of its own.
    choices = [" " + c.strip() for c in item["choices"]]
    if item["task"] == "hellaswag":
        return [(item["question"], c) for c in choices]
    if "\nQuestion:" in item["question"]:
        return [(item["question"] + "\nAnswer:", c) for c in choices]
    return [(f"Question: {item['question']}\nAnswer:", c) for c in choices]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, cut from the ids of their concatenation (lm-eval's rule, so merges match)."""
    # Trailing whitespace belongs with the continuation: BPE attaches a space to the word after it.
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    n_context = len(tokenizer(stripped)["input_ids"])
    if n_context >= len(whole):
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return whole[:n_context], whole[n_context:]


def score_continuations(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each continuation given its context, in input order.

    Rows are left-padded with positions counted from each row's first real token, so every continuation ends in
    the last column and the model is asked for only the last max(continuation) logits.
    """
    device = _device(model)
    seqs = []
    for context, continuation in requests:
        seq = context + continuation
        if max_tokens is not None and len(seq) > max_tokens:
            seq = seq[-max_tokens:]  # keep the end: the continuation and the context nearest to it
        seqs.append((seq[:-1], continuation))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    starts = range(0, len(order), batch_size)
    with _inference(model):
        for start in tqdm(starts, desc="probe: multiple choice", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            input_ids, mask, positions = left_pad([seqs[i][0] for i in idx], pad_id)
            keep = max(len(seqs[i][1]) for i in idx)
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            )
            for row, i in enumerate(idx):
                target = torch.tensor(seqs[i][1], device=device)
                logp = torch.log_softmax(out.logits[row, keep - len(target) :].float(), dim=-1)
                results[i] = (float(logp.gather(-1, target[:, None]).sum()), len(target))
    return results


def multiple_choice(model, tokenizer, items: list[dict], batch_size: int = 8, progress: bool = False) -> dict:
    """Multiple-choice accuracy overall and per task.

    `acc_norm` (reported as `accuracy`) picks the choice with the highest mean log-prob per continuation token
    (length-normalised); `acc` picks the highest summed log-prob. WinoGrande scores one shared continuation, so
    the two agree there. `correct` lists each item's acc_norm outcome, for paired before/after comparisons.
    """
    spans, requests = [], []
    for item in items:
        pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in mc_requests(item)]
        spans.append((len(requests), len(requests) + len(pairs)))
        requests.extend(pairs)
    max_tokens = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    scores = score_continuations(model, requests, batch_size, tokenizer.pad_token_id, max_tokens, progress)
    tasks: dict[str, dict] = {}
    correct, correct_sum = [], []
    for item, (lo, hi) in zip(items, spans):
        sums = [s for s, _ in scores[lo:hi]]
        means = [s / n for s, n in scores[lo:hi]]
        hit_norm = int(max(range(len(means)), key=means.__getitem__) == item["answer_index"])
        hit_sum = int(max(range(len(sums)), key=sums.__getitem__) == item["answer_index"])
        correct.append(hit_norm)
        correct_sum.append(hit_sum)
        t = tasks.setdefault(item["task"], {"n": 0, "acc": 0, "acc_norm": 0})
        t["n"] += 1
        t["acc"] += hit_sum
        t["acc_norm"] += hit_norm
    for t in tasks.values():
        t["acc"] /= t["n"]
        t["acc_norm"] /= t["n"]
    n = len(items)
    return {
        "n": n,
        "accuracy": sum(correct) / n if n else float("nan"),
        "acc": sum(correct_sum) / n if n else float("nan"),
        "acc_norm": sum(correct) / n if n else float("nan"),
        "tasks": tasks,
        "tokens": sum(len(c) + len(t) - 1 for c, t in requests),
        "ids": [item["id"] for item in items],
        "correct": correct,
    }


# ----------------------------------------------------------------------------------------------- the probes


def probe_key(cfg: ProbeConfig) -> dict:
    """What determines the probe numbers: version, config (data by content, not path); KL is not in it."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("kl", "text_file", "items_file")}
    return {
        "probe_version": PROBE_VERSION,
        **fields,
        "text_sha256": file_digest(cfg.text_file),
        "items_sha256": file_digest(cfg.items_file),
    }


def run_probes(model, tokenizer, cfg: ProbeConfig, base_model=None, progress: bool = True) -> dict:
    """Perplexity and multiple-choice probes (and KL to the base when `cfg.kl`) for one model.

    KL needs the base: pass `base_model`, or leave it None for a PEFT model (its adapters switched off).
    """
    started = time.perf_counter()
    text = Path(cfg.text_file).read_text(encoding="utf-8")
    windows = text_windows(tokenizer, text, cfg.window_tokens, cfg.n_windows)
    with_kl = cfg.kl and (base_model is not None or hasattr(model, "disable_adapter"))
    window_nll, window_kl = window_scores(
        model, windows, cfg.windows_per_forward, base_model if with_kl else _NO_BASE, progress
    )
    ppl = _perplexity_record(window_nll, cfg.window_tokens)
    ppl_seconds = time.perf_counter() - started  # with KL: the perplexity and KL pass together
    items = select_items(read_items(cfg.items_file), cfg.mc_items)
    mc = multiple_choice(model, tokenizer, items, cfg.batch_size, progress)
    result = {
        "probe_version": PROBE_VERSION,
        "key_hash": json_digest(probe_key(cfg)),
        "config": dataclasses.asdict(cfg),
        "perplexity": ppl,
        "multiple_choice": mc,
        "kl": None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": _device(model).type,
    }
    seconds = {"perplexity": ppl_seconds, "multiple_choice": time.perf_counter() - started - ppl_seconds}
    if with_kl:
        result["kl"] = _kl_record(window_kl, cfg.window_tokens)
    result["seconds"] = {**seconds, "total": time.perf_counter() - started}
    return result


def base_probes_cached(
    source,
    tokenizer,
    model_loader: Callable[[], torch.nn.Module],
    cfg: ProbeConfig,
    cache_dir: str | Path,
    key_extra: dict | None = None,
) -> dict:
    """The base model's probe results, computed once (calling `model_loader()`) and then read from `cache_dir`.

    Put what else changes the numbers in `key_extra` (dtype, device type): the delta of an unchanged model is
    exactly zero only when base and tuned are probed the same way.
    """
    from arxiv_ft.modeling import ModelSource

    source = ModelSource(source) if isinstance(source, str) else source
    record = source.record()
    key = {
        # The weights' fingerprint, not the path: a retrained folder at the same path is another model.
        "model": {k: record[k] for k in ("hub_id", "revision", "fingerprint")} | {"name": source.name},
        "tokenizer": [type(tokenizer).__name__, len(tokenizer)],
        "probe": probe_key(cfg),
        "extra": key_extra or {},
    }
    compute = lambda: run_probes(model_loader(), tokenizer, dataclasses.replace(cfg, kl=False))  # noqa: E731
    return cached_json(cache_dir, "base-probes", key, compute)[0]


def forgetting_intervals(base: dict, tuned: dict) -> dict:
    """95% paired bootstrap intervals: perplexity change in % (over windows), MC accuracy change (over items), mean
    KL (over windows). None where the probes predate per-window numbers."""
    import numpy as np

    from arxiv_ft.stats import bootstrap_mean, paired_bootstrap

    out = {"ppl_change_pct": None, "mc_delta": None, "kl": None}
    nb, nt = base["perplexity"].get("window_nll"), tuned["perplexity"].get("window_nll")
    if nb and nt:
        per_window = base["perplexity"]["window_tokens"] - 1

        def ppl_change(b, t):
            return 100 * (np.exp((t.sum() - b.sum()) / (len(t) * per_window)) - 1)

        out["ppl_change_pct"] = paired_bootstrap(nb, nt, ppl_change)
    mb, mt = base["multiple_choice"]["correct"], tuned["multiple_choice"]["correct"]
    out["mc_delta"] = paired_bootstrap(mb, mt, lambda b, t: t.mean() - b.mean())
    window_kl = (tuned.get("kl") or {}).get("window_kl")
    if window_kl:
        per_window = tuned["kl"]["positions"] / len(window_kl)
        out["kl"] = bootstrap_mean(np.asarray(window_kl) / per_window)
    return out


def forgetting_delta(base: dict, tuned: dict) -> dict:
    """Tuned minus base: perplexity (delta, ratio, % change), MC accuracy overall and per task, items lost and
    gained, KL; with their 95% intervals under "ci95"."""
    if base["key_hash"] != tuned["key_hash"]:
        raise ValueError("base and tuned probes were run with different probe configs or data; not comparable")
    pb, pt = base["perplexity"], tuned["perplexity"]
    mb, mt = base["multiple_choice"], tuned["multiple_choice"]
    # Paired outcome per item: with ~100 items a 2-point change is a handful of flips either way.
    flips = list(zip(mb["correct"], mt["correct"]))
    intervals = forgetting_intervals(base, tuned)
    return {
        "ppl_change_pct": 100 * (pt["ppl"] / pb["ppl"] - 1),
        "ppl_before": pb["ppl"],
        "ppl_after": pt["ppl"],
        "ppl_delta": pt["ppl"] - pb["ppl"],
        "ppl_ratio": pt["ppl"] / pb["ppl"],
        "nll_delta": pt["nll"] - pb["nll"],
        "mc_before": mb["accuracy"],
        "mc_after": mt["accuracy"],
        "mc_delta": mt["accuracy"] - mb["accuracy"],
        "mc_acc_delta": mt["acc"] - mb["acc"],
        "mc_items_lost": sum(1 for b, t in flips if b and not t),
        "mc_items_gained": sum(1 for b, t in flips if t and not b),
        "mc_task_delta": {task: mt["tasks"][task]["acc_norm"] - v["acc_norm"] for task, v in mb["tasks"].items()},
        "kl": (tuned.get("kl") or {}).get("kl"),
        "ci95": {name: value["ci95"] if value else None for name, value in intervals.items()},
        "mc_items": mb["n"],
        "ppl_tokens": pt["tokens"],
    }


def describe_forgetting(delta: dict) -> str:
    """One line: each forgetting figure with its 95% interval."""
    ci = delta.get("ci95") or {}

    def span(name, scale=1.0, digits=1):
        low_high = ci.get(name)
        return f" [{low_high[0] * scale:+.{digits}f}, {low_high[1] * scale:+.{digits}f}]" if low_high else ""

    text = (
        f"WikiText-2 perplexity {delta['ppl_before']:.2f} -> {delta['ppl_after']:.2f} "
        f"({delta['ppl_change_pct']:+.1f}%{span('ppl_change_pct')}, {delta['ppl_tokens']:,} tokens); "
        f"multiple choice {delta['mc_before']:.3f} -> {delta['mc_after']:.3f} "
        f"({100 * delta['mc_delta']:+.1f} pp{span('mc_delta', 100)}, {delta['mc_items']} items)"
    )
    if delta.get("kl") is not None:
        low_high = ci.get("kl")
        text += f"; KL(base || tuned) {delta['kl']:.4f} nats/token" + (
            f" [{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
        )
    return text


# ------------------------------------------------------------------------------ a training run's probes


def probe_config(cfg) -> ProbeConfig:
    """The probes a train config asks for."""
    return ProbeConfig(n_windows=cfg.probe_windows, mc_items=cfg.probe_mc_items, kl=cfg.probe_kl)


def probe_base(run) -> dict | None:
    """The base model's probe results (cached per base model + probe config: probed once, not once per run).

    Probed before training, through the model being trained: LoRA and DoRA adapters start as the identity.
    `run`: the training's context (phases.Run).
    """
    from arxiv_ft.modeling import cache_dir

    cfg, launch, task, trainable = run.cfg, run.launch, run.task, run.trainable
    if not cfg.probes:
        return None

    key = base_probe_key(launch.dtype, launch.device, launch.method)
    model = launch.accelerator.unwrap_model(trainable.model)
    return base_probes_cached(
        task.source, task.tokenizer, lambda: model, probe_config(cfg), cache_dir() / "probes", key
    )


def base_probe_key(dtype, device, method) -> dict:
    """What besides the base and the probe config changes the base's probe numbers (their cache key's extra part)."""
    key = {"dtype": str(dtype), "device": device.type, "quantized": method.quantized}
    if method.quantized:  # the base is probed through the kernel training uses (see prepare_for_kbit)
        key["kernel"] = "dequantize-matmul"
    return key


def probe_tuned(run, base: dict | None) -> dict | None:
    """The tuned model's probes and the difference from the base (`run`: the training's context, phases.Run)."""
    cfg, launch, task, trainable = run.cfg, run.launch, run.task, run.trainable
    if not cfg.probes:
        return None

    model = launch.accelerator.unwrap_model(trainable.model)
    # KL needs the base's next-token distributions: an adapter switched off is the base; full fine-tuning has
    # changed every weight, so the base is loaded again (a second copy, for the probe only).
    reference, probes = None, probe_config(cfg)
    if cfg.probe_kl and not hasattr(model, "disable_adapter"):
        if launch.kind in ("zero3", "zero3-offload", "fsdp"):
            # A second, unsharded copy is what sharding is there to avoid (and loading it would enter ZeRO-3's
            # partitioning): KL is left out here, and the perplexity and multiple-choice probes still run.
            launch.log("forgetting: KL(base || tuned) is not measured for full fine-tuning under ZeRO-3/FSDP")
            probes = dataclasses.replace(probes, kl=False)
        else:
            from arxiv_ft.modeling import load_model

            reference = load_model(task.source, launch.dtype, cfg.trust_remote_code).to(launch.device)
    tuned = run_probes(model, task.tokenizer, probes, base_model=reference)
    del reference
    delta = forgetting_delta(base, tuned)
    launch.log("forgetting: " + describe_forgetting(delta))
    return {"base": base, "tuned": tuned, "delta": delta}
