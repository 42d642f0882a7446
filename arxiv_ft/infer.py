"""Classify arXiv papers into their primary category with a fine-tuned (or a base) causal LM; sharded, resumable.

    accelerate launch infer.py --model-dir runs/default --input papers.jsonl.gz --output preds.jsonl
    accelerate launch --num_processes 8 infer.py --model-dir runs/x --input 'dump/part*.jsonl.gz' --output p.jsonl
    arxiv-ft infer --model-dir runs/default --arxiv-ids 2401.12345,cs/0101001 --output preds.jsonl
    arxiv-ft infer --model smollm2-135m --labels cs.LG,cs.CL --query 'cat:cs.*' --max-results 200 --output o.jsonl
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29511 infer.py ...      # 2 processes on CPU (gloo)

Each input item (a record, or a line that could not become one) gets an index: its position in the input stream
(files in the order given, blank lines not counted). Every process takes the indices i with i % world == rank;
the output is sharded and resumable (arxiv_ft/shards.py): rerunning the same command after a crash or a requeue
skips what was written. `--model-dir` takes a run folder, one of its checkpoints, or best/; the label set and prompt
come from it, so inference cannot drift from training. More rejects than `--max-reject-fraction` of all items: exit
status 3, after everything good was written.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from arxiv_ft.options import InferConfig, TrainConfig

logger = logging.getLogger("arxiv_ft")


@dataclass(frozen=True)
class InferTask:
    """What inference classifies into, and how: the label set, the prompt spec, the run folder it comes from (None for
    a zero-shot base model) and the temperature the label scores are divided by (calibration.py)."""

    labels: list[str]
    prompt: object  # prompts.PromptSpec
    run: object | None  # rundir.RunDir
    temperature: float = 1.0


def label_set_id(labels: list[str]) -> str:
    """A short name for a label set by content (rows say which set they were classified into)."""
    import hashlib

    digest = hashlib.sha256("\n".join(labels).encode()).hexdigest()[:12]
    return f"{len(labels)}-labels-{digest}"


def infer(cfg: InferConfig) -> dict:
    """Classify this process's share of the input, then (process 0) merge; returns the summary on every process."""
    # Heavy libraries load here, after the command line is parsed: `--help` and a bad option answer at once.
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from arxiv_ft.modeling import resolve_dtype, set_cpu_threads
    from arxiv_ft.shards import ShardedOutput

    # ACCELERATE_USE_CPU: what Accelerator() reads, but PartialState() alone ignores (it then starts 1 process).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    rank, world = state.process_index, state.num_processes
    if state.device.type == "cpu":
        set_cpu_threads(cfg.cpu_threads)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world:
        raise SystemExit(f"launcher says WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate started {world}")
    output = ShardedOutput(cfg.output, rank, world)
    spec = resolve_task(cfg)
    paths = expand_inputs(cfg.input) if cfg.input else [output.side("input.jsonl")]
    refuse_overwriting_inputs(output, paths if cfg.input else [])
    dtype = resolve_dtype(cfg.dtype, state.device)
    run = run_record(cfg, spec, paths, dtype)
    lock = claim(output, state)
    started_here = not output.side("run.json").exists()
    try:
        classify_all(cfg, state, output, spec, paths, run, dtype)
    except BaseException:
        # A run that failed before writing any prediction leaves nothing behind (its run.json would only refuse
        # the next attempt with other arguments); one with predictions keeps everything for the resume.
        if state.is_main_process and started_here and not output.parts() and not output.out.exists():
            output.side("run.json").unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    return json.loads(Path(output.side("summary.json")).read_text())


def classify_all(cfg: InferConfig, state, output, spec: InferTask, paths, run: dict, dtype) -> None:
    """Check and record the run, classify this process's share, and (process 0) merge and write the summary."""
    from accelerate.utils import gather_object

    output.check_run(run)  # every process checks, so all of them stop alike
    if state.is_main_process:
        output.write_run(run)
        if not cfg.input and not paths[0].exists():
            fetch_to_file(cfg, paths[0])  # once: every process and every restart then sees the same papers
    state.wait_for_everyone()
    done = output.done()
    state.wait_for_everyone()  # nobody truncates or appends until everybody has read the parts
    load_started = time.perf_counter()
    classifier = load_classifier(cfg, spec, state.device, dtype)
    load_seconds = time.perf_counter() - load_started
    counts, n_items = classify_share(cfg, state, output, classifier, paths, done)
    ranks = gather_object([{"rank": state.process_index, **counts}])
    if state.is_main_process:
        this_run = {"already_done_at_start": len(done), "load_seconds": load_seconds}
        write_summary(cfg, output, spec, n_items, ranks, this_run)
    state.wait_for_everyone()


def classify_share(cfg: InferConfig, state, output, classifier, paths, done: set) -> tuple[dict, int]:
    """Classify this process's share (item index mod world size) of what is not done yet, a window of batches at a
    time; returns its counts (predicted, rejected, seconds, peak RSS) and the number of input items."""
    from tqdm.auto import tqdm

    rank, world = state.process_index, state.num_processes
    started = time.perf_counter()
    total = _count_lines(paths[0]) if not cfg.input else None  # a fetched list has a known length; a stream not
    mine_total = None if total is None else len([i for i in range(rank, total, world) if i not in done])
    counts, n_items = {"predicted": 0, "rejected": 0}, 0
    progress = tqdm(total=mine_total, unit="paper", desc="infer", disable=not (cfg.progress and state.is_main_process))
    output.open()
    try:
        chunk = []  # read ahead, so batches can be cut from papers of similar length
        for index, item in enumerate(iter_items(paths)):
            n_items = index + 1
            if index % world != rank or index in done:
                continue
            chunk.append((index, *item))
            if len(chunk) >= cfg.window_batches * cfg.batch_size:
                classify_chunk(classifier, chunk, cfg, output, counts, progress)
                chunk = []
        if chunk:
            classify_chunk(classifier, chunk, cfg, output, counts, progress)
    finally:
        output.close()
        progress.close()
    counts["seconds"] = time.perf_counter() - started
    counts["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return counts, n_items


def write_summary(cfg: InferConfig, output, spec: InferTask, n_items: int, ranks: list[dict], this_run: dict) -> None:
    """Process 0: merge the part files and write `OUT.summary.json` (counts, rejects, metrics, throughput)."""
    merged = output.merge(spec.labels, n_items)
    n_rejected = merged["n_rejected"]
    wall = max(r["seconds"] for r in ranks)
    predicted = sum(r["predicted"] for r in ranks)
    summary = {
        "output": str(output.out),
        "rejects": str(output.side("rejects.jsonl")),
        "n_items": n_items,
        **merged,
        "reject_fraction": n_rejected / n_items if n_items else 0.0,
        "max_reject_fraction": cfg.max_reject_fraction,
        "over_reject_limit": n_items > 0 and n_rejected / n_items > cfg.max_reject_fraction,
        "this_run": {
            "world_size": len(ranks),
            "already_done_at_start": this_run["already_done_at_start"],
            "processed": sum(r["predicted"] + r["rejected"] for r in ranks),
            "load_seconds": this_run["load_seconds"],
            "seconds": wall,  # the slowest process, from its first read to its last write
            "papers_per_second": predicted / wall if wall > 0 else None,
            "peak_rss_bytes": max(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, *(r["peak_rss_bytes"] for r in ranks)
            ),  # one process, merge included
            "per_process": ranks,
        },
    }
    output.write_summary(summary)
    logger.info(console_summary(summary, output.out))


def console_summary(summary: dict, out) -> str:
    """What the run did, in one line: scored, left out (and why), abstained, and the metrics on what they cover."""
    m, answered = summary["metrics"], summary.get("metrics_answered")
    text = f"{summary['n_predicted']} scored, {summary['n_rejected']} rejected of {summary['n_items']} -> {out}"
    if summary["n_abstained"]:
        n_out = summary["n_abstained_true_out_of_label_set"]
        text += f"; {summary['n_abstained']} abstained ({n_out} of them outside the label set)"
    if m:
        text += f"; accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} over the {m['n']} papers in the label set"
        text += " (abstentions count as wrong)" if summary["n_abstained"] else ""
    if answered:
        text += f"; {answered['accuracy']:.4f} on the {answered['n']} of them answered"
    if summary["n_true_out_of_label_set"]:
        text += (
            f"; {summary['n_true_out_of_label_set']} paper(s) whose true category is outside the label set are left "
            "out of the metrics (their rows say true_in_label_set: false)"
        )
    return text


def resolve_task(cfg: InferConfig) -> InferTask:
    """Labels, prompt spec (and the run folder): from the training output folder, or from the zero-shot options."""
    from arxiv_ft import records as rec
    from arxiv_ft.prompts import PromptSpec, get_template

    if not cfg.model_dir:
        if cfg.labels.startswith("top:"):
            raise SystemExit("--labels top:K needs a training file; give a label file or comma-separated labels")
        try:
            labels = rec.label_set(cfg.labels, "")
            train = TrainConfig()  # zero-shot prompts default to train's
            spec = PromptSpec(
                cfg.template or train.template,
                cfg.max_seq_tokens or train.max_seq_tokens,
                cfg.token_budget or train.token_budget,
                chat_kwargs={"date_string": zero_shot_date(cfg)},
            )
            get_template(spec.template)
        except ValueError as exc:
            raise SystemExit(f"--labels/--template: {exc}") from None
        return InferTask(labels, spec, None, cfg.temperature or 1.0)
    from arxiv_ft.calibration import read_temperature
    from arxiv_ft.rundir import RunDir

    run = RunDir(cfg.model_dir).check()
    labels, spec, trained = run.labels(), run.prompt(), run.config()
    for key in ("template", "max_seq_tokens"):
        if key in trained and trained[key] != getattr(spec, key):
            raise SystemExit(
                f"{run.path}: prompt.json says {key}={getattr(spec, key)!r}, train_config.json {trained[key]!r}"
            )
    try:
        get_template(spec.template)
    except ValueError as exc:
        raise SystemExit(f"{run.path}/prompt.json: {exc} (was the model trained by another arxiv_ft?)") from None
    # Inference must not drift from training: an option that disagrees with the folder is an error, not an override.
    given = {
        "labels": cfg.labels and rec.label_set(cfg.labels, ""),
        "template": cfg.template,
        "max_seq_tokens": cfg.max_seq_tokens,
        "token_budget": cfg.token_budget,
    }
    saved = {"labels": labels, "template": spec.template, "max_seq_tokens": spec.max_seq_tokens}
    saved["token_budget"] = spec.token_budget
    for key, value in given.items():
        if value and value != saved[key]:
            raise SystemExit(f"--{key.replace('_', '-')} {value!r} differs from what {run.path} was trained with")
    return InferTask(labels, spec, run, cfg.temperature or read_temperature(run.path))


def zero_shot_date(cfg: InferConfig) -> str:
    """The date a zero-shot run's chat template prints: --chat-date, else the one this output started with (a
    resumed output keeps its prompts), else today."""
    from arxiv_ft.prompts import chat_date_string
    from arxiv_ft.shards import ShardedOutput

    started = ShardedOutput(cfg.output).side("run.json")
    if not cfg.chat_date and started.is_file():
        return json.loads(started.read_text()).get("chat_kwargs", {}).get("date_string") or chat_date_string()
    return cfg.chat_date or chat_date_string()


def run_record(cfg: InferConfig, spec: InferTask, paths, dtype) -> dict:
    """What decides the content of an output line; a resumed output must agree with all of it."""
    from arxiv_ft.modeling import ModelSource

    if spec.run is not None:
        model = {"model_dir": str(spec.run.path.resolve()), "fingerprint": spec.run.fingerprint()}
    else:
        model = {"model": cfg.model, "fingerprint": ModelSource(cfg.model).record()["fingerprint"]}
    source = {"arxiv_ids": cfg.arxiv_ids.split(",")} if cfg.arxiv_ids else {}
    if cfg.query:
        source = {"query": cfg.query, "max_results": cfg.max_results, "sort_by": cfg.sort_by}
    return {
        **model,
        "labels": spec.labels,
        **spec.prompt.to_json(),
        "mode": cfg.mode,
        "top_k": cfg.top_k if cfg.mode == "score" else None,
        "temperature": spec.temperature if cfg.mode == "score" else None,
        "abstain": [cfg.abstain_on, cfg.abstain_below] if cfg.abstain_below else None,
        "quantize": cfg.quantize,
        "max_new_tokens": cfg.max_new_tokens if cfg.mode == "generate" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "input": [input_identity(p) for p in paths] if cfg.input else source,
    }


def input_identity(path: Path) -> dict:
    """An input file by path, size and content: a file changed between a kill and the resume (lines reordered, same
    size) would otherwise be resumed by index, some papers twice and some never (~2 s per GB to hash)."""
    from arxiv_ft.fileio import file_digest

    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_digest(path)}


def refuse_overwriting_inputs(output, inputs) -> None:
    """The output (or a file beside it) must not be one of the inputs: merging would replace the input."""
    written = [output.out, output.side("rejects.jsonl"), output.side("summary.json"), output.side("run.json")]
    resolved = {p.resolve() for p in inputs}
    clash = [str(p) for p in written if p.resolve() in resolved]
    if clash:
        raise SystemExit(f"--output {output.out} would overwrite the input {clash[0]}: choose another output name")


def claim(output, state):
    """Lock the output for this run (a second identical run stops at once instead of redoing the work)."""
    from arxiv_ft.fileio import FolderLock, claim_on_main

    return claim_on_main(state, lambda: FolderLock(output.out.parent, f".{output.out.name}.lock").acquire("infer"))


def load_classifier(cfg: InferConfig, spec: InferTask, device, dtype):
    """The model to classify with: a run folder's, or a base model (zero-shot)."""
    from arxiv_ft.classifier import Classifier
    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.modeling import ModelSource, load_model, load_tokenizer, model_config, quantize_int8
    from arxiv_ft.scoring import check_scoring_memory

    run = spec.run
    if run is not None:
        tokenizer, source = run.load_tokenizer(cfg.trust_remote_code), run.base_source()
    else:
        tokenizer, source = load_tokenizer(cfg.model, cfg.trust_remote_code), ModelSource(cfg.model)
        if tokenizer.chat_template is None:
            raise SystemExit(f"the tokenizer of {cfg.model!r} has no chat template: zero-shot needs a chat model")
    builder = PromptBuilder.from_spec(tokenizer, spec.prompt, spec.labels)
    config = model_config(source, cfg.trust_remote_code)
    if config is not None and cfg.mode == "score" and (run is None or not run.has_head()):
        check_scoring_memory(builder, config, cfg.batch_size, device, "--batch-size")  # before the model loads
    if run is not None:
        model, head = run.load_model(dtype, cfg.trust_remote_code), run.load_head(device)
    else:
        model, head = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code), None
    if head is not None and cfg.abstain_below and cfg.abstain_on == "label_mass":
        raise SystemExit("--abstain-on label_mass: a classification-head run has no label mass; use confidence")
    if cfg.quantize == "int8":
        model = quantize_int8(model, device, dtype)
    return Classifier(model.to(device).eval(), tokenizer, builder, head, spec.temperature)


def expand_inputs(spec: str):
    """Comma-separated paths or globs (each glob sorted by name), in the order given; each must exist."""
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(Path(p).is_file() for p in matches):
            raise SystemExit(f"--input {item!r}: no such file")
        paths += [Path(p) for p in matches]
    return paths


def fetch_to_file(cfg: InferConfig, path) -> None:
    """Fetch the papers named by --arxiv-ids or --query into a JSONL file, atomically."""
    from arxiv_ft.arxiv_api import ArxivAPIError, ArxivClient
    from arxiv_ft.shards import write_input_file

    client = ArxivClient(base_url=cfg.api_base_url, min_interval_s=cfg.api_min_interval_s)
    try:
        if cfg.arxiv_ids:
            asked = [s.strip() for s in cfg.arxiv_ids.split(",") if s.strip()]
            records = client.fetch_ids(asked)
            if len(records) < len(asked):
                logger.warning(f"{len(asked) - len(records)} of {len(asked)} ids not found by the arXiv API")
        else:
            records = list(client.search(cfg.query, max_results=cfg.max_results, sort_by=cfg.sort_by))
    except ArxivAPIError as exc:
        raise SystemExit(f"arXiv API: {exc}") from None
    if client.skipped_entries:
        logger.warning(f"skipped {len(client.skipped_entries)} API entries with no id or no category")
    n = write_input_file(records, path)
    logger.info(f"fetched {n} papers from {cfg.api_base_url} into {path}")


def iter_items(paths):
    """(path, line or row number, Record or Reject) for every non-blank line / row of every file, in order."""
    from arxiv_ft import records as rec

    for path in paths:
        for line_no, item in rec.iter_records_and_rejects(path):
            yield str(path), line_no, item


def classify_chunk(classifier, chunk: list, cfg: InferConfig, output, counts: dict, progress) -> None:
    """Classify a read-ahead chunk of (index, path, line_no, item): rejects first, then length-sorted batches."""
    import torch

    from arxiv_ft import records as rec

    lines, todo = [], []
    for index, path, line_no, item in chunk:
        prompt = None if isinstance(item, rec.Reject) else classifier.builder.prompt_ids(item)
        if isinstance(item, rec.Reject):
            lines.append({"index": index, "reject": item.to_json()})
        elif prompt is None:
            reason = f"prompt does not fit max_seq_tokens={classifier.builder.max_seq_tokens} even with no abstract"
            reject = rec.Reject(path, line_no, reason, json.dumps(item.to_json(), ensure_ascii=False))
            lines.append({"index": index, "reject": reject.to_json() | {"true": item.primary}})
        else:
            todo.append((index, item, prompt))
    counts["rejected"] += len(lines)
    output.write(lines)
    progress.update(len(lines))
    todo.sort(key=lambda t: len(t[2]))  # similar lengths in a batch: little padding
    row = Rows(classifier.labels, cfg, with_mass=classifier.head is None)
    for start in range(0, len(todo), cfg.batch_size):
        batch = todo[start : start + cfg.batch_size]
        if cfg.mode == "score":
            with torch.no_grad():
                probs, mass = classifier.scores([p for _, _, p in batch])
            lines = [row.scored(i, r, probs[k], None if mass is None else mass[k]) for k, (i, r, _) in enumerate(batch)]
        else:
            gens = classifier.generate([r for _, r, _ in batch], len(batch), cfg.max_new_tokens)
            lines = [row.generated(i, r, text, label) for (i, r, _), (text, label) in zip(batch, gens)]
        output.write(lines)
        counts["predicted"] += len(lines)
        progress.update(len(lines))
        progress.set_postfix(rejected=counts["rejected"], refresh=False)


class Rows:
    """Output rows, one schema for JSONL and Parquet (shards._types): score mode `index, id, predicted, top_k,
    confidence, label_mass (not for a classification head), abstained, true, true_in_label_set, label_set`; generate
    mode `index, id, predicted, generated, true, true_in_label_set, label_set`. `predicted` is null when the model
    abstained (score) or its text named no label (generate)."""

    def __init__(self, labels: list[str], cfg: InferConfig, with_mass: bool = True):
        self.labels, self.allowed, self.cfg, self.with_mass = labels, set(labels), cfg, with_mass
        self.k, self.label_set = min(cfg.top_k, len(labels)), label_set_id(labels)

    def known(self, record) -> dict:
        """The paper's true category (when the input has one) and whether it is in the label set."""
        in_set = None if not record.primary else record.primary in self.allowed
        return {"true": record.primary, "true_in_label_set": in_set, "label_set": self.label_set}

    def scored(self, index: int, record, probs, mass) -> dict:
        top_p, top_i = probs.topk(self.k)
        top = [[self.labels[i], round(p, 6)] for p, i in zip(top_p.tolist(), top_i.tolist())]
        confidence = round(float(top_p[0]), 6)  # the row's value decides (a reader can redo the threshold)
        mass = {"label_mass": float(f"{float(mass):.6g}")} if self.with_mass else {}  # 6 significant digits
        score = confidence if self.cfg.abstain_on == "confidence" else mass["label_mass"]
        abstained = bool(self.cfg.abstain_below) and score < self.cfg.abstain_below
        row = {"index": index, "id": record.id, "predicted": None if abstained else top[0][0], "top_k": top}
        return row | {"confidence": confidence, **mass, "abstained": abstained, **self.known(record)}

    def generated(self, index: int, record, text: str, label: str | None) -> dict:
        return {"index": index, "id": record.id, "predicted": label, "generated": text, **self.known(record)}


def _count_lines(path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line: exit 3 when more than --max-reject-fraction of the items were rejected."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.logs import setup_logging

    cfg = parse_config(InferConfig, argv, __doc__, prog)
    setup_logging()
    summary = infer(cfg)
    if summary["over_reject_limit"]:
        logger.error(
            f"{summary['n_rejected']} of {summary['n_items']} input items rejected "
            f"({summary['reject_fraction']:.2%} > --max-reject-fraction {summary['max_reject_fraction']:.2%}); "
            f"see {summary['rejects']}. Every good record was still classified into {summary['output']}."
        )
        sys.exit(3)


if __name__ == "__main__":
    main()
