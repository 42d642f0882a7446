"""Classify arXiv papers into their primary category with a fine-tuned (or a base) causal LM; sharded, resumable.

    accelerate launch infer.py --model-dir runs/default --input papers.jsonl.gz --output preds.jsonl
    accelerate launch --num_processes 8 infer.py --model-dir runs/x --input 'dump/part*.jsonl.gz' --output p.jsonl
    python infer.py --model-dir runs/default --arxiv-ids 2401.12345,cs/0101001 --output preds.jsonl
    python infer.py --model smollm2-135m --labels cs.LG,cs.CL --query 'cat:cs.*' --max-results 200 --output o.jsonl
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29511 infer.py ...      # 2 processes on CPU (gloo)

Each input item (a record, or a line that could not become one) gets an index: its position in the input stream
(files in the order given, blank lines not counted). Process r of W takes the indices i with i % W == r and
appends one JSON line per index to `OUT.part-{r:05d}-of-{W:05d}.jsonl`, fsynced after every batch. A restart
with the same arguments reads every existing part file (whatever world size wrote it), skips the indices found
there, and truncates its own file after its last complete line. At the end process 0 merges all parts, by index
and once per index, into `--output` (prediction lines, which keep their `index`), `OUT.rejects.jsonl` (lines that
are not usable records, or whose prompt cannot fit) and `OUT.summary.json`. More rejects than
`--max-reject-fraction` of all items: exit status 3 (under `accelerate launch` the launcher reports it as a
failed worker with exitcode 3), after everything good was written.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from arxiv_ft import config as cfglib
from arxiv_ft import records as rec
from arxiv_ft.arxiv_api import ArxivClient
from arxiv_ft.config import option
from arxiv_ft.data import PromptBuilder
from arxiv_ft.metrics import classification_metrics
from arxiv_ft.modeling import load_model, load_tokenizer, load_trained, set_cpu_threads, torch_dtype
from arxiv_ft.prompts import DEFAULT_TEMPLATE, get_template
from arxiv_ft.scoring import LabelScorer, generate_labels

DEFAULT_MAX_SEQ_TOKENS = 192  # train.py's default budget, for zero-shot runs


@dataclass(frozen=True)
class InferConfig:
    # input: exactly one of the three
    input: str = option("", "JSONL/.jsonl.gz files in snapshot format: comma-separated paths or globs, read in order")
    arxiv_ids: str = option("", "comma-separated arXiv ids, fetched through the arXiv API")
    query: str = option("", "arXiv API search query, e.g. 'cat:cs.*'")
    max_results: int = option(100, "with --query: how many papers at most")
    sort_by: str = option(
        "submittedDate", "with --query: result order", ("submittedDate", "lastUpdatedDate", "relevance")
    )
    api_base_url: str = option(ArxivClient.base_url, "arXiv API endpoint")
    api_min_interval_s: float = option(3.0, "seconds between arXiv API requests (arXiv asks for 3)")
    # model: a train.py output folder, or a base model with an explicit label set (zero-shot)
    model_dir: str = option("", "train.py output folder: model/adapter, labels.txt, prompt.json, train_config.json")
    model: str = option("", "base model for zero-shot: hub id, local folder, or 'smollm2-135m' (needs --labels)")
    labels: str = option("", "with --model: label file or comma-separated labels")
    template: str = option("", f"with --model: prompt template id (empty = {DEFAULT_TEMPLATE})")
    max_seq_tokens: int = option(0, f"with --model: prompt + answer token budget (0 = {DEFAULT_MAX_SEQ_TOKENS})")
    dtype: str = option("auto", "weights/compute dtype: auto = bf16 on a bf16 GPU, else fp32", ("auto", "fp32", "bf16"))
    trust_remote_code: bool = option(False, "allow model code from the model folder/hub to run")
    # classification
    mode: str = option("score", "score every label (probabilities) or generate free text", ("score", "generate"))
    top_k: int = option(3, "with --mode score: how many (label, probability) pairs per paper")
    max_new_tokens: int = option(8, "with --mode generate: tokens generated per paper")
    batch_size: int = option(16, "papers per forward pass per process")
    window_batches: int = option(64, "batches read ahead and sorted by prompt length (less padding)")
    cpu_threads: int = option(0, "CPU only: torch threads per process (0 = usable cores / local processes)")
    # output
    output: str = option("predictions.jsonl", "merged predictions (.jsonl, or .parquet when pyarrow is installed)")
    max_reject_fraction: float = option(0.01, "exit 3 if more than this fraction of input items is rejected")
    progress: bool = option(True, "show a progress bar (process 0)")

    def __post_init__(self):
        if sum(bool(x) for x in (self.input, self.arxiv_ids, self.query)) != 1:
            raise ValueError("give exactly one input: --input, --arxiv-ids or --query")
        if bool(self.model_dir) == bool(self.model):
            raise ValueError("give exactly one of --model-dir (a train.py output) or --model (zero-shot)")
        if self.model and not self.labels:
            raise ValueError("--model needs --labels (a label file or comma-separated labels)")
        for name in ("batch_size", "window_batches", "top_k", "max_new_tokens", "max_results"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def main(cfg: InferConfig) -> dict:
    """Classify this process's share of the input, then (process 0) merge; returns the summary on every process."""
    # ACCELERATE_USE_CPU: what Accelerator() reads, but PartialState() alone ignores (it then starts 1 process).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    if state.device.type == "cpu":
        set_cpu_threads(cfg.cpu_threads)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world:
        raise SystemExit(f"launcher says WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate started {world}")
    out = Path(cfg.output)
    labels, template_id, max_seq_tokens = resolve_task(cfg)
    template = get_template(template_id)

    # The arguments that decide what a line says; a resumed run must agree with them or it would mix two runs.
    source = {"arxiv_ids": cfg.arxiv_ids.split(",")} if cfg.arxiv_ids else {}
    source = {"query": cfg.query, "max_results": cfg.max_results, "sort_by": cfg.sort_by} if cfg.query else source
    paths = expand_inputs(cfg.input) if cfg.input else [side_path(out, "input.jsonl")]
    run = {
        "model_dir": str(Path(cfg.model_dir).resolve()) if cfg.model_dir else None,
        "model": cfg.model or None,
        "labels": labels,
        "template": template_id,
        "max_seq_tokens": max_seq_tokens,
        "mode": cfg.mode,
        "top_k": cfg.top_k if cfg.mode == "score" else None,
        "input": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths] if cfg.input else source,
    }
    check_run(out, run)  # every process checks, so all of them stop alike
    if state.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        cfglib.save_json(run, side_path(out, "run.json"))
        if not cfg.input and not paths[0].exists():
            # Fetched once, into a file: every process and every restart then sees the same papers in the same order.
            fetch_to_file(cfg, paths[0])
    state.wait_for_everyone()
    done = set()
    for part in all_parts(out):
        done.update(index for index, _ in read_part(part)[0])
    n_done_before = len(done)
    state.wait_for_everyone()  # nobody truncates or appends until everybody has read the parts
    my_part = out.with_name(f"{out.name}.part-{rank:05d}-of-{world:05d}.jsonl")
    if my_part.exists():
        os.truncate(my_part, read_part(my_part)[1])  # a crash can leave half a line; it is redone

    load_started = time.perf_counter()
    dtype = resolve_dtype(cfg.dtype, state.device)
    if cfg.model_dir:
        tokenizer = load_tokenizer(cfg.model_dir, cfg.trust_remote_code)
        model = load_trained(cfg.model_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        model = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model = model.to(state.device).eval()
    builder = PromptBuilder(tokenizer, template, labels, max_seq_tokens)
    scorer = LabelScorer(model, builder, tokenizer.pad_token_id) if cfg.mode == "score" else None
    load_seconds = time.perf_counter() - load_started

    # The loop: read a window of my items, reject what cannot be classified, score length-sorted batches.
    started = time.perf_counter()
    total = _count_lines(paths[0]) if not cfg.input else None  # a fetched list has a known length; a stream not
    mine_total = None if total is None else len([i for i in range(rank, total, world) if i not in done])
    progress = tqdm(total=mine_total, unit="paper", desc="infer", disable=not (cfg.progress and state.is_main_process))
    counts: Counter[str] = Counter()
    window, n_items = [], 0
    with open(my_part, "ab") as fh:
        for index, (path, line_no, item) in enumerate(iter_items(paths)):
            n_items = index + 1
            if index % world != rank or index in done:
                continue
            window.append((index, path, line_no, item))
            if len(window) >= cfg.window_batches * cfg.batch_size:
                classify_window(window, builder, scorer, model, tokenizer, cfg, fh, counts, progress)
                window = []
        if window:
            classify_window(window, builder, scorer, model, tokenizer, cfg, fh, counts, progress)
    progress.close()
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ranks = gather_object([{"rank": rank, "seconds": seconds, "peak_rss_bytes": peak_rss, **counts}])

    summary_path = side_path(out, "summary.json")
    if state.is_main_process:
        merged = merge_parts(out, labels, n_items)
        processed = sum(r.get("predicted", 0) + r.get("rejected", 0) for r in ranks)
        predicted = sum(r.get("predicted", 0) for r in ranks)
        wall = max(r["seconds"] for r in ranks)
        merge_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        n_rejected = merged["n_rejected"]
        summary = {
            "output": str(out),
            "rejects": str(side_path(out, "rejects.jsonl")),
            "n_items": n_items,
            **merged,
            "reject_fraction": n_rejected / n_items if n_items else 0.0,
            "max_reject_fraction": cfg.max_reject_fraction,
            "over_reject_limit": n_items > 0 and n_rejected / n_items > cfg.max_reject_fraction,
            "this_run": {
                "world_size": world,
                "already_done_at_start": n_done_before,
                "processed": processed,  # predicted + rejected by this run, all processes
                "load_seconds": load_seconds,
                "seconds": wall,  # the slowest process, from its first read to its last write
                "papers_per_second": predicted / wall if wall > 0 else None,
                "peak_rss_bytes": max(merge_rss, *(r["peak_rss_bytes"] for r in ranks)),  # one process, merge included
                "per_process": ranks,
            },
        }
        cfglib.save_json(summary, summary_path)
        m = summary["metrics"]
        state.print(
            f"{summary['n_predicted']} predicted, {n_rejected} rejected of {n_items} -> {out}"
            + (f"; accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} (n={m['n']})" if m else "")
        )
    state.wait_for_everyone()
    return json.loads(summary_path.read_text())


def resolve_task(cfg: InferConfig) -> tuple[list[str], str, int]:
    """(labels, template id, max_seq_tokens): from the training output folder, or from the zero-shot options."""
    if not cfg.model_dir:
        if cfg.labels.startswith("top:"):
            raise SystemExit("--labels top:K needs a training file; give a label file or comma-separated labels")
        labels = rec.label_set(cfg.labels, "")
        template_id = cfg.template or DEFAULT_TEMPLATE
        _known_template(template_id, "--template")
        return labels, template_id, cfg.max_seq_tokens or DEFAULT_MAX_SEQ_TOKENS
    folder = Path(cfg.model_dir)
    for name in ("labels.txt", "prompt.json", "train_config.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder} is not a train.py output folder: {name} is missing")
    labels = rec.read_labels(folder / "labels.txt")
    prompt = json.loads((folder / "prompt.json").read_text())
    trained = json.loads((folder / "train_config.json").read_text())
    for key in ("template", "max_seq_tokens"):
        if key in trained and trained[key] != prompt[key]:
            raise SystemExit(f"{folder}: prompt.json says {key}={prompt[key]!r}, train_config.json {trained[key]!r}")
    _known_template(prompt["template"], f"{folder}/prompt.json", " (was the model trained by another arxiv_ft?)")
    # Inference must not drift from training: an option that disagrees with the folder is an error, not an override.
    given = {"labels": cfg.labels and rec.label_set(cfg.labels, ""), "template": cfg.template}
    given["max_seq_tokens"] = cfg.max_seq_tokens
    saved = {"labels": labels, "template": prompt["template"], "max_seq_tokens": prompt["max_seq_tokens"]}
    for key, value in given.items():
        if value and value != saved[key]:
            raise SystemExit(f"--{key.replace('_', '-')} {value!r} differs from what {folder} was trained with")
    return labels, prompt["template"], prompt["max_seq_tokens"]


def _known_template(template_id: str, where: str, hint: str = "") -> None:
    try:
        get_template(template_id)
    except ValueError as exc:
        raise SystemExit(f"{where}: {exc}{hint}") from None


def expand_inputs(spec: str) -> list[Path]:
    """Comma-separated paths or globs (each glob sorted by name), in the order given; each must exist."""
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(Path(p).is_file() for p in matches):
            raise SystemExit(f"--input {item!r}: no such file")
        paths += [Path(p) for p in matches]
    return paths


def side_path(out: Path, suffix: str) -> Path:
    """A file that belongs to the output: OUT.run.json, OUT.rejects.jsonl, OUT.summary.json, OUT.input.jsonl."""
    return out.with_name(f"{out.name}.{suffix}")


def all_parts(out: Path) -> list[Path]:
    """Every part file of this output, whatever world size wrote it."""
    return sorted(out.parent.glob(f"{out.name}.part-*-of-*.jsonl"))


def check_run(out: Path, run: dict) -> None:
    """Refuse to resume an output that was started with other arguments."""
    path = side_path(out, "run.json")
    if not path.exists():
        return
    before = json.loads(path.read_text())
    diff = sorted(k for k in run.keys() | before.keys() if run.get(k) != before.get(k))
    if diff:
        raise SystemExit(
            f"{out} was started with a different {', '.join(diff)} (see {path}): refusing to mix two runs; "
            f"use another --output, or delete {out}.* to start over"
        )


def fetch_to_file(cfg: InferConfig, path: Path) -> None:
    """Fetch the papers named by --arxiv-ids or --query into a JSONL file, atomically."""
    client = ArxivClient(base_url=cfg.api_base_url, min_interval_s=cfg.api_min_interval_s)
    if cfg.arxiv_ids:
        asked = [s.strip() for s in cfg.arxiv_ids.split(",") if s.strip()]
        records = client.fetch_ids(asked)
        if len(records) < len(asked):
            print(f"{len(asked) - len(records)} of {len(asked)} ids not found by the arXiv API", file=sys.stderr)
    else:
        records = client.search(cfg.query, max_results=cfg.max_results, sort_by=cfg.sort_by)
    tmp = path.with_name(path.name + ".tmp")
    n = rec.write_records(records, tmp)
    tmp.replace(path)
    print(f"fetched {n} papers from {cfg.api_base_url} into {path}", file=sys.stderr)


def iter_items(paths: list[Path]):
    """(path, line number, Record or Reject) for every non-blank line of every file, in order."""
    for path in paths:
        for line_no, item in rec.iter_records_and_rejects(path):
            yield str(path), line_no, item


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


def classify_window(window, builder, scorer, model, tokenizer, cfg: InferConfig, fh, counts: Counter, progress):
    """Classify one window of (index, path, line_no, item); append a line per item to `fh`, fsynced per batch."""
    lines, todo = [], []
    for index, path, line_no, item in window:
        prompt = None if isinstance(item, rec.Reject) else builder.prompt_ids(item)
        if isinstance(item, rec.Record) and prompt is None:
            reason = f"prompt does not fit max_seq_tokens={builder.max_seq_tokens} even with no abstract"
            item = rec.Reject(path, line_no, reason, json.dumps(item.to_json(), ensure_ascii=False))
        if isinstance(item, rec.Reject):
            lines.append({"index": index, "reject": item.to_json()})
        else:
            todo.append((index, item, prompt))
    counts["rejected"] += len(lines)
    _write(fh, lines)
    progress.update(len(lines))
    todo.sort(key=lambda t: len(t[2]))  # similar lengths in a batch: little padding
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start : start + cfg.batch_size]
        lines = []
        if scorer is not None:
            probs = torch.softmax(scorer.score_prompts([p for _, _, p in batch]), dim=-1)
            top_p, top_i = probs.topk(min(cfg.top_k, len(builder.labels)), dim=-1)
            for row, (index, record, _) in enumerate(batch):
                top = [[builder.labels[i], round(p, 6)] for p, i in zip(top_p[row].tolist(), top_i[row].tolist())]
                lines.append(
                    {"index": index, "id": record.id, "predicted": top[0][0], "top_k": top, "true": record.primary}
                )
        else:
            gens = generate_labels(model, tokenizer, builder, [r for _, r, _ in batch], len(batch), cfg.max_new_tokens)
            for (index, record, _), (text, label) in zip(batch, gens):
                line = {"index": index, "id": record.id, "predicted": label, "top_k": None, "true": record.primary}
                lines.append(line | {"generated": text})
        _write(fh, lines)
        counts["predicted"] += len(lines)
        progress.update(len(lines))
        progress.set_postfix(rejected=counts["rejected"], refresh=False)


def _write(fh, lines: list[dict]) -> None:
    # One write of whole lines, then fsync: after a crash the file ends in complete lines or half of the last one.
    if lines:
        fh.write(b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\n" for x in lines))
        fh.flush()
        os.fsync(fh.fileno())


def merge_parts(out: Path, labels: list[str], n_items: int) -> dict:
    """Write the output and rejects in index order, each index once, from all part files; return counts and metrics.

    Only (index, file, offset) triples are held in memory, not the lines, so a dump-sized merge stays small.
    """
    parts = all_parts(out)
    indices, files, offsets = array("q"), array("q"), array("q")
    for file_no, part in enumerate(parts):
        for index, offset in read_part(part)[0]:
            indices.append(index)
            files.append(file_no)
            offsets.append(offset)
    idx = np.frombuffer(indices, dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    unique, first = np.unique(idx[order], return_index=True)  # a duplicate index keeps its first copy
    if len(unique) != n_items or (n_items and (unique[0] != 0 or unique[-1] != n_items - 1)):
        raise RuntimeError(f"the part files of {out} hold {len(unique)} of {n_items} input items; run again to resume")
    by_name = {label: label for label in labels}
    y_true, y_pred, out_of_set, reasons = [], [], Counter(), Counter()
    n_predicted = 0
    handles = [open(p, "rb") for p in parts]
    rejects_path = side_path(out, "rejects.jsonl")
    writer = _open_output(out)
    try:
        with open(rejects_path.with_name(rejects_path.name + ".tmp"), "wb") as rejects:
            for k in order[first]:
                fh = handles[files[k]]
                fh.seek(offsets[k])
                line = fh.readline()
                obj = json.loads(line)
                if "reject" in obj:
                    rejects.write(json.dumps({"index": obj["index"], **obj["reject"]}, ensure_ascii=False).encode())
                    rejects.write(b"\n")
                    reasons[re.sub(r"\d+", "N", obj["reject"]["reason"].split(":")[0])] += 1
                    continue
                writer.write(line, obj)
                n_predicted += 1
                if obj["true"] in by_name:
                    y_true.append(by_name[obj["true"]])
                    y_pred.append(by_name.get(obj["predicted"]))
                elif obj["true"] is not None:
                    out_of_set[obj["true"]] += 1
            _sync(rejects)
        writer.close()
    finally:
        for h in handles:
            h.close()
    rejects_path.with_name(rejects_path.name + ".tmp").replace(rejects_path)
    return {
        "n_predicted": n_predicted,
        "n_rejected": sum(reasons.values()),
        "rejects_by_reason": dict(reasons.most_common()),
        "n_true_in_label_set": len(y_true),
        "n_true_out_of_label_set": sum(out_of_set.values()),
        "out_of_label_set": dict(out_of_set.most_common(50)),
        "metrics": classification_metrics(y_true, y_pred, labels) if y_true else None,
    }


class _JsonlWriter:
    """Merged JSONL: the part lines byte for byte, to a temporary file renamed into place when complete."""

    def __init__(self, out: Path):
        self.out, self.tmp = out, out.with_name(out.name + ".tmp")
        self.fh = open(self.tmp, "wb")

    def write(self, line: bytes, obj: dict) -> None:
        self.fh.write(line)

    def close(self) -> None:
        _sync(self.fh)
        self.fh.close()
        self.tmp.replace(self.out)


class _ParquetWriter:
    """Merged Parquet: top-k as parallel label/probability lists; written in row groups of 50,000."""

    def __init__(self, out: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.out, self.tmp, self.rows = pa, out, out.with_name(out.name + ".tmp"), []
        fields = [("index", pa.int64()), ("id", pa.string()), ("predicted", pa.string()), ("true", pa.string())]
        fields += [("top_k_labels", pa.list_(pa.string())), ("top_k_probs", pa.list_(pa.float64()))]
        fields += [("generated", pa.string())]
        self.schema = pa.schema(fields)
        self.fh = pq.ParquetWriter(self.tmp, self.schema)

    def write(self, line: bytes, obj: dict) -> None:
        top = obj["top_k"] or []
        row = {k: obj.get(k) for k in ("index", "id", "predicted", "true", "generated")}
        self.rows.append(row | {"top_k_labels": [t[0] for t in top], "top_k_probs": [t[1] for t in top]})
        if len(self.rows) >= 50_000:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.fh.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.fh.close()
        self.tmp.replace(self.out)


def _open_output(out: Path):
    if out.suffix != ".parquet":
        return _JsonlWriter(out)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit(f"{out}: Parquet output needs pyarrow (pip install pyarrow), or use .jsonl") from None
    return _ParquetWriter(out)


def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a bf16 GPU, else fp32: bf16 matmuls on CPUs without AMX are ~100x slower than fp32."""
    if name != "auto":
        return torch_dtype(name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


if __name__ == "__main__":
    summary = main(cfglib.parse_config(InferConfig, sys.argv[1:], __doc__))
    if summary["over_reject_limit"]:
        print(
            f"error: {summary['n_rejected']} of {summary['n_items']} input items rejected "
            f"({summary['reject_fraction']:.2%} > --max-reject-fraction {summary['max_reject_fraction']:.2%}); "
            f"see {summary['rejects']}. Every good record was still classified into {summary['output']}.",
            file=sys.stderr,
        )
        sys.exit(3)
