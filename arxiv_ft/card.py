"""The model card every run folder carries (README.md, a `huggingface_hub.ModelCard`), and the upload to the Hub.

The card says what someone receiving the folder needs: the base model by Hub id, the label set and prompt, accuracy
and macro-F1 on the test papers (the final number) and on the validation papers (what choices were made on), beside
TF-IDF fitted on the same training papers (tuned and untuned), forgetting with its intervals, cost, and the command
that made it.
"""

from __future__ import annotations

from pathlib import Path


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


def model_card(cfg, task, metrics: dict, base: dict, command: str) -> str:
    """The README.md text of a run folder (YAML metadata + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    hub_id = base.get("hub_id")
    adapter = cfg.method != "full"
    data = ModelCardData(
        base_model=hub_id,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=["arxiv-ft", "arxiv", "text-classification", cfg.method],
        license=None,
    )
    from arxiv_ft.forgetting import describe_forgetting

    delta = (metrics.get("forgetting") or {}).get("delta")
    cost = metrics["cost"]
    forgetting = describe_forgetting(delta) + " (95% intervals)" if delta else "not measured (--probes false)"
    device = f"{cost['device_count']} × {cost['device_type']}"
    lines = [
        f"# arXiv primary-category classifier ({cfg.method} on {hub_id or base.get('name')})",
        "",
        f"Fine-tuned with [arxiv-ft](https://github.com/) to name an arXiv paper's primary category among "
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
        "or `python infer.py --model-dir THIS_FOLDER --input papers.jsonl --output preds.jsonl`.",
        "",
        "## Task",
        "",
        f"- labels: {', '.join(task.labels)}",
        f"- prompt: template `{task.prompt.template}`, {task.prompt.max_seq_tokens} tokens "
        f"({'the paper alone' if task.prompt.token_budget == 'paper' else 'in all'}); chat variables pinned: "
        f"{task.prompt.chat_kwargs or 'none'}",
        f"- training data: {len(task.examples)} papers from `{cfg.train_file}`; evaluation: "
        f"{len(task.eval_records)} papers from `{cfg.eval_file}`",
        f"- objective: {cfg.objective}; {cfg.epochs:g} epoch(s), {metrics['train']['steps']} steps, batch "
        f"{cfg.batch_size}×{cfg.grad_accum_steps}, lr {cfg.lr:g} ({cfg.lr_schedule}), seed {cfg.seed}",
        "",
        "## Results",
        "",
        *results_table(metrics, len(task.test_records), len(task.eval_records)),
        "",
        f"Forgetting: {forgetting}.",
        "",
        f"Cost: {cost['wall_seconds'] / 60:.1f} min wall on {device} ({cost['train_seconds'] / 60:.1f} min "
        f"training), {cost['trainable_parameters']:,} trainable of {cost['total_parameters']:,} parameters, peak "
        f"memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB.",
        "",
        "## Base model",
        "",
        f"`{base.get('name')}` (Hub id `{hub_id}`, revision `{base.get('revision')}`, weights fingerprint "
        f"`{base.get('fingerprint')}`).",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        "The resolved configuration is in `train_config.json`, every figure in `metrics.json`, the run record in "
        "`ledger.json`.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


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
