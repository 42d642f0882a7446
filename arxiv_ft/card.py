"""The model card every run folder carries (README.md, a `huggingface_hub.ModelCard`), and the upload to the Hub,
which is also its own retryable step:

    arxiv-ft push runs/x --repo me/arxiv-lora

The model card every run folder carries (README.md, a `huggingface_hub.ModelCard`), and the upload to the Hub.

The card says what someone receiving the folder needs: the base model by Hub id, the label set and prompt, accuracy
and macro-F1 on the test papers (the final number) and on the validation papers (what choices were made on), beside
TF-IDF fitted on the same training papers (tuned and untuned), forgetting with its intervals, cost, and the command
that made it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The base model's license, where known by Hub id prefix (the card's `license:`; unknown bases get none).
LICENSES = {
    "HuggingFaceTB/SmolLM2": "apache-2.0",
    "meta-llama/Llama-3.2": "llama3.2",
    "meta-llama/Llama-3.1": "llama3.1",
    "meta-llama/Meta-Llama-3": "llama3",
}
ARXIV_DATASET = "arxiv-community/arxiv_dataset"  # the arXiv metadata on the Hub; the shipped samples are cut from it


def portable(path: str) -> str:
    """A path as it reads on another machine: relative to the project, or ~/..., or the file name alone (a card
    carried this machine's absolute paths)."""
    p = Path(path)
    if not p.is_absolute():
        return path
    for base, prefix in ((ROOT, ""), (Path.home(), "~/")):
        try:
            return prefix + str(p.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return p.name


def portable_command(command: str) -> str:
    """A command line with each absolute path (alone or after `=`) made `portable`."""
    words = []
    for word in shlex.split(command):
        flag, eq, value = word.partition("=")
        if eq and value.startswith("/"):
            word = f"{flag}={portable(value)}"
        elif word.startswith("/"):
            word = portable(word)
        words.append(shlex.quote(word))
    return " ".join(words)


def _license(hub_id: str | None) -> str | None:
    return next((name for prefix, name in LICENSES.items() if (hub_id or "").startswith(prefix)), None)


def _eval_results(metrics: dict, n_test: int, n_validation: int) -> list:
    """The Hub's model-index: accuracy and macro-F1 on the test papers (and on validation)."""
    from huggingface_hub import EvalResult

    from arxiv_ft.ledger import scored_as

    results = []
    test = metrics.get("test") or {}
    for split, after, n in (("test", test.get("after"), n_test), ("validation", metrics.get("after"), n_validation)):
        scores = scored_as(after)
        for metric in ("accuracy", "macro_f1") if scores else ():
            results.append(
                EvalResult(
                    task_type="text-classification",
                    dataset_type=ARXIV_DATASET,
                    dataset_name=f"arXiv primary category, {split} papers ({n})",
                    dataset_split=split,
                    metric_type="f1" if metric == "macro_f1" else "accuracy",
                    metric_name="macro-F1" if metric == "macro_f1" else "accuracy",
                    metric_value=round(scores[metric], 4),
                )
            )
    return results


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _row(name: str, scores: dict | None) -> str:
    if not scores:
        return f"| {name} | — | — |"
    return f"| {name} | {_pct(scores['accuracy'])} | {_pct(scores['macro_f1'])} |"


def results_table(metrics: dict, n_test: int, n_validation: int) -> list[str]:
    """Test (final) and validation (selection) scores of the fine-tune and of TF-IDF on the same training papers."""
    from arxiv_ft.ledger import scored_as

    test = metrics.get("test") or {}
    sets = {"validation": (metrics.get("after"), metrics.get("tfidf") or {}, n_validation)}
    if test:
        sets = {"test": (test.get("after"), test.get("tfidf") or {}, n_test)} | sets
    header = " | ".join(f"{name} accuracy ({n} papers) | {name} macro-F1" for name, (_, _, n) in sets.items())
    lines = [f"| model | {header} |", "|---|" + "---|---|" * len(sets)]

    def row(name, pick):
        cells = []
        for split, (after, tfidf, _) in sets.items():
            scores = pick(split, after, tfidf)
            cells += [_pct(scores["accuracy"]), _pct(scores["macro_f1"])] if scores else ["—", "—"]
        return f"| {name} | " + " | ".join(cells) + " |"

    zero_shot = scored_as(metrics.get("before"))
    lines.append(row("base model, zero-shot", lambda split, a, t: zero_shot if split == "validation" else None))
    lines.append(row("**this fine-tune**", lambda split, a, t: scored_as(a)))
    names = {
        "tuned_llm_text": "TF-IDF word+char, C by CV on the training papers, the text the LLM reads",
        "tuned_full_text": "TF-IDF word+char, C by CV on the training papers, full abstract",
        "llm_text": "TF-IDF word 1-2-grams, C=1 (untuned), the text the LLM reads",
        "full_text": "TF-IDF word 1-2-grams, C=1 (untuned), full abstract",
    }
    lines += [row(label, lambda split, a, t, key=key: t.get(key)) for key, label in names.items()]
    return lines


def model_card(cfg, task, metrics: dict, base: dict, command: str, revision: str | None = None) -> str:
    """The README.md text of a run folder (YAML metadata with the Hub's model-index, + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = base.get("hub_id")
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if cfg.method != "full" else "transformers",
        pipeline_tag="text-generation",
        tags=["arxiv-ft", "arxiv", "text-classification", cfg.method],
        license=_license(hub_id),
        datasets=[ARXIV_DATASET] if _shipped(cfg) else None,
        model_name=f"arxiv-ft {cfg.method} {hub_id or base.get('name')}",
        eval_results=_eval_results(metrics, len(task.test_records), len(task.eval_records)) or None,
    )
    lines = [*_use_section(cfg, task, hub_id or base.get("name")), *_task_section(cfg, task, metrics)]
    lines += [*_results_section(task, metrics), *_provenance_section(base, command, revision)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _shipped(cfg) -> bool:
    return Path(cfg.train_file).resolve().is_relative_to(ROOT / "arxiv_ft" / "assets")


def _use_section(cfg, task, model_name: str) -> list[str]:
    peft = ", or plain peft: `AutoPeftModelForCausalLM.from_pretrained(THIS_FOLDER)`." if cfg.method != "full" else "."
    return [
        f"# arXiv primary-category classifier ({cfg.method} on {model_name})",
        "",
        "Fine-tuned with arxiv-ft to name an arXiv paper's primary category among "
        f"{len(task.labels)} labels from its title and abstract. It answers with the category id followed by the "
        "end-of-turn token; arxiv-ft scores every allowed label (constrained, with probabilities).",
        "",
        "## Use",
        "",
        "```python",
        "from arxiv_ft import Classifier",
        'clf = Classifier.from_pretrained("THIS_FOLDER")',
        'clf.predict([{"title": "...", "abstract": "..."}], top_k=3)',
        "```",
        "",
        "or `python infer.py --model-dir THIS_FOLDER --input papers.jsonl --output preds.jsonl`" + peft,
        "",
    ]


def _task_section(cfg, task, metrics: dict) -> list[str]:
    where = "shipped with arxiv-ft, cut from the arXiv metadata" if _shipped(cfg) else "the user's"
    test = f"; test: {len(task.test_records)} papers from `{portable(cfg.test_path)}`" if task.test_records else ""
    return [
        "## Task",
        "",
        f"- labels: {', '.join(task.labels)}",
        f"- prompt: template `{task.prompt.template}`, {task.prompt.max_seq_tokens} tokens "
        f"({'the paper alone' if task.prompt.token_budget == 'paper' else 'in all'}); chat variables pinned: "
        f"{task.prompt.chat_kwargs or 'none'}",
        f"- training data: {len(task.examples)} papers from `{portable(cfg.train_file)}` ({where}); validation: "
        f"{len(task.eval_records)} papers from `{portable(cfg.eval_file)}`{test}",
        f"- objective: {cfg.objective}; {cfg.epochs:g} epoch(s), {metrics['train']['steps']} steps, batch "
        f"{cfg.batch_size}×{cfg.grad_accum_steps}, lr {cfg.lr:g} ({cfg.lr_schedule}), seed {cfg.seed}",
        "",
    ]


def _results_section(task, metrics: dict) -> list[str]:
    from arxiv_ft.forgetting import describe_forgetting

    delta = (metrics.get("forgetting") or {}).get("delta")
    cost = metrics["cost"]
    forgetting = describe_forgetting(delta) + " (95% intervals)" if delta else "not measured (--probes false)"
    return [
        "## Results",
        "",
        *results_table(metrics, len(task.test_records), len(task.eval_records)),
        "",
        f"Forgetting: {forgetting}.",
        "",
        f"Cost: {cost['wall_seconds'] / 60:.1f} min wall on {cost['device_count']} × {cost['device_type']} "
        f"({cost['train_seconds'] / 60:.1f} min training), {cost['trainable_parameters']:,} trainable of "
        f"{cost['total_parameters']:,} parameters, peak memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB.",
        "",
    ]


def _provenance_section(base: dict, command: str, revision: str | None) -> list[str]:
    hub_id = base.get("hub_id")
    return [
        "## Base model",
        "",
        f"`{portable(base.get('name') or '')}` (Hub id `{hub_id}`, revision `{base.get('revision')}`, weights "
        f"fingerprint `{base.get('fingerprint')}`); license: {_license(hub_id) or 'the base model’s'}.",
        "",
        "## Reproduce",
        "",
        f"In a checkout of arxiv-ft at revision `{revision or 'unknown'}` (`git checkout {revision or 'REV'}`):",
        "",
        "```bash",
        "bash tools/setup.sh                 # .venv with the pinned stack",
        "source .venv/bin/activate",
        portable_command(command),
        "```",
        "",
        "The resolved configuration is in `train_config.json`, every figure in `metrics.json`, the run record in "
        "`ledger.json`.",
        "",
    ]


def merged_card(run_dir: Path, dtype: str) -> str | None:
    """The card of a merged folder: the run's, as a plain transformers model, saying what was merged."""
    from huggingface_hub import ModelCard

    if not (Path(run_dir) / "README.md").is_file():
        return None
    card = ModelCard.load(Path(run_dir) / "README.md")
    card.data.library_name = "transformers"
    note = (
        f"This folder is the run's adapter folded into the base weights ({dtype}): it loads with "
        "`AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` and needs neither peft nor the base model.\n\n"
    )
    title, _, rest = card.text.lstrip("\n").partition("\n")
    return str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{title}\n\n{note}{rest.lstrip()}"))


def push_run(run_dir: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload a run folder (without checkpoints) to a Hub model repo; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(run_dir),
        repo_type="model",
        ignore_patterns=["checkpoints/*", "best.*", "*.partial/*", "logs/*", ".lock"],
        commit_message="arxiv-ft run",
    )
    return str(url)


def push_finished(run_dir: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload a finished run folder; a folder without its ledger (unfinished, or not a run) is refused."""
    from arxiv_ft.rundir import RunDir

    run = RunDir(run_dir).check()
    if not run.is_finished():
        raise SystemExit(f"{run_dir}: not a finished run (no ledger.json): finish or resume it before uploading")
    return push_run(run.path, repo_id, private)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`arxiv-ft push RUN --repo REPO`: the upload alone (after a --push-to-hub that failed, or later)."""
    import sys

    from arxiv_ft.config import parse_config
    from arxiv_ft.options import PushConfig

    cfg = parse_config(PushConfig, argv, __doc__, prog)
    try:
        url = push_finished(cfg.run_dir, cfg.repo, cfg.private)
    except SystemExit:
        raise
    except Exception as exc:  # offline, no token, a server error: say so, and how to retry
        raise SystemExit(upload_failed(cfg.run_dir, cfg.repo, exc)) from None
    print(f"uploaded {cfg.run_dir} to {url}", file=sys.stdout)


def upload_failed(run_dir, repo_id: str, exc: Exception) -> str:
    return (
        f"the upload of {run_dir} to {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the "
        f"run folder is complete and unchanged: retry the upload alone with `arxiv-ft push {run_dir} --repo {repo_id}`"
    )
