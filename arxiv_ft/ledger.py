"""The ledger: one typed, self-describing record of a run (task scores, forgetting, cost, provenance).

`train` and the TF-IDF baseline write it; only the report reads it. `Ledger.from_json` validates, so a hand-edited
or foreign file is refused with every problem named, before any figure is computed from it. Version 1 files written
before the optional per-paper outcomes (`task.after.ids` / `correct`, used by the report's paired bootstrap) still
read.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from arxiv_ft.fileio import write_json

LEDGER_VERSION = 1
# Methods that are not fine-tuning methods: the base model alone, and the classical baselines.
BASELINE_METHODS = ("zero-shot", "tfidf-svm", "tfidf-logreg")


class LedgerError(ValueError):
    """A ledger file that is not a valid ledger; the message names the file and every problem."""


def known_methods() -> tuple[str, ...]:
    """Every method a ledger may name: zero-shot, the fine-tuning methods (from their table), the baselines."""
    from arxiv_ft.methods import METHODS

    return ("zero-shot", *METHODS, *BASELINE_METHODS[1:])


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass
class Ledger:
    """One run. `task` holds the validation scores: "after", and where measured "before" (the zero-shot model),
    "tfidf" (untuned TF-IDF on the same papers reading the prompt's text), "tfidf_full_text" (the full abstract),
    "tfidf_tuned" and "tfidf_tuned_full_text" (word + char n-grams, C by cross-validation on the training papers).
    `test`, where the run had test papers, holds the same entries (no "before") on them. Scores are {"accuracy",
    "macro_f1", "n"} and optionally the per-paper `ids` and `correct` (0/1)."""

    run_id: str
    method: str
    seed: int
    model: str
    config: dict
    data: dict  # train_file, eval_file, n_train, n_eval, labels
    task: dict
    forgetting: dict | None  # {"base", "tuned", "delta"} from arxiv_ft.forgetting, or None when not probed
    cost: dict | None  # wall/train seconds, device type/count/hours, tokens, MFU, memory, parameters, bytes, money
    train: dict  # {"loss_curve": [...], "steps": n}
    versions: dict = dataclasses.field(default_factory=dict)
    git_revision: str | None = None
    created: str = ""
    ledger_version: int = LEDGER_VERSION
    run_name: str | None = None  # --run-name (the trackers' name); run_id is the output folder's name
    _note: str | None = None  # free text that travels into the report (fixtures say they are fabricated)
    test: dict | None = None  # the test papers' scores (same entries as `task`); None = no test evaluation

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for optional in ("_note", "run_name", "test"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_json(cls, data, where: str = "ledger") -> Ledger:
        """A validated ledger; every problem is named in one LedgerError."""
        problems = validate_ledger(data)
        if problems:
            raise LedgerError(f"{where}: " + "; ".join(problems))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def read(cls, path: str | Path) -> Ledger:
        """Read and validate one ledger file; a problem is a LedgerError naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: {exc}") from None
        return cls.from_json(data, str(path))

    def write(self, path: str | Path) -> Path:
        """Validate, then write atomically: an invalid ledger is a bug here, not a surprise for the report."""
        problems = validate_ledger(self.to_json())
        if problems:
            raise LedgerError(f"refusing to write an invalid ledger to {path}: {'; '.join(problems)}")
        return write_json(path, self.to_json())


def validate_ledger(d) -> list[str]:
    """Every problem with a ledger record, as short messages; an empty list means it is valid."""
    if not isinstance(d, dict):
        return ["not a JSON object"]
    required = [f.name for f in dataclasses.fields(Ledger) if f.name not in ("_note", "run_name", "test")]
    problems = [f"missing key {k!r}" for k in required if k not in d]
    if problems:
        return problems
    if d["ledger_version"] != LEDGER_VERSION:
        problems.append(f"ledger_version {d['ledger_version']!r}, this reader knows {LEDGER_VERSION}")
    if not isinstance(d["run_id"], str) or not d["run_id"]:
        problems.append("run_id must be a non-empty string")
    if d["method"] not in known_methods():
        problems.append(f"method {d['method']!r} not one of {', '.join(known_methods())}")
    if not isinstance(d["seed"], int):
        problems.append("seed must be an integer")
    data = d["data"]
    if not isinstance(data, dict) or not all(_is_number(data.get(k)) for k in ("n_train", "n_eval")):
        problems.append("data must hold n_train and n_eval")
    for section in ("task", "test"):
        if section == "test" and d.get("test") is None:
            continue
        problems.extend(_score_problems(section, d[section]))
    forgetting = d["forgetting"]
    if forgetting is not None:
        parts = [forgetting.get(k) if isinstance(forgetting, dict) else None for k in ("base", "tuned", "delta")]
        delta = parts[2]
        if not all(isinstance(p, dict) for p in parts) or not all(
            _is_number(delta.get(k)) for k in ("ppl_delta", "mc_delta")
        ):
            problems.append("forgetting must be null or hold base, tuned and a delta with ppl_delta and mc_delta")
    cost = d["cost"]
    if cost is not None:
        if not isinstance(cost, dict):
            problems.append("cost must be an object or null")
        else:
            bad = [k for k, v in cost.items() if v is not None and k != "device_type" and not _is_number(v)]
            problems.extend(f"cost.{k} must be a number or null" for k in bad)
    train = d["train"]
    if not isinstance(train, dict) or not all(_is_number(x) for x in train.get("loss_curve", [])):
        problems.append("train.loss_curve must be a list of numbers")
    return problems


SCORE_ENTRIES = ("before", "after", "tfidf", "tfidf_full_text", "tfidf_tuned", "tfidf_tuned_full_text")


def _score_problems(section: str, scored) -> list[str]:
    """What is wrong with a ledger's `task` or `test` section."""
    if not isinstance(scored, dict) or not isinstance(scored.get("after"), dict):
        return [f"{section}.after is required"]
    problems = []
    for when in SCORE_ENTRIES:
        scores = scored.get(when)
        if scores is None:
            continue
        if not isinstance(scores, dict) or not all(_is_number(scores.get(k)) for k in ("accuracy", "macro_f1")):
            problems.append(f"{section}.{when} needs numeric accuracy and macro_f1")
        elif (scores.get("ids") is None) != (scores.get("correct") is None) or (
            scores.get("ids") is not None and len(scores["ids"]) != len(scores["correct"])
        ):
            problems.append(f"{section}.{when}: ids and correct must come together, one outcome per paper")
    return problems


def scored_as(result: dict | None) -> dict | None:
    """An evaluation's label-scoring result, or its generation result under --eval-mode generate."""
    result = result or {}
    return result.get("score") or result.get("generate")


def scores(metrics: dict | None, with_papers: bool = True) -> dict | None:
    """The ledger's view of a classification result: accuracy, macro-F1, n (and per-paper outcomes)."""
    if not metrics:
        return None
    out = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n": metrics["n"]}
    if with_papers and metrics.get("ids") is not None:
        out["ids"], out["correct"] = metrics["ids"], metrics["correct"]
    return out


def package_versions(*names: str) -> dict:
    """Installed versions of the named distributions (None when absent), plus Python's: the ledger's `versions`."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_revision(folder: str | Path | None = None) -> str | None:
    """The commit checked out at `folder` (default: this package's), or None outside a git checkout."""
    import subprocess

    folder = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder, timeout=10)
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            cwd=folder,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = done.stdout.strip() or None
    # Uncommitted changes to the package: the commit alone does not say what ran.
    return f"{revision}-dirty" if revision and changes.stdout.strip() else revision


def now() -> str:
    """The ledger's timestamp format: UTC, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_run_ledger(run, metrics: dict) -> None:
    """The typed record of a training run (`run`: phases.Run), written last: a folder with ledger.json holds a finished
    run. The main process writes it."""
    from arxiv_ft.config import to_dict

    cfg, launch, task = run.cfg, run.launch, run.task
    if not launch.is_main:
        return

    cost = dict(metrics["cost"])
    for key in ("flops_per_token", "parameter_bytes"):
        cost.pop(key, None)
    ledger = Ledger(
        run_id=Path(cfg.output_dir).name,
        method=cfg.method,
        seed=cfg.seed,
        model=cfg.model,
        config=to_dict(cfg),
        data={
            "train_file": cfg.train_file,
            "eval_file": cfg.eval_file,
            "test_file": cfg.test_path or None,
            "n_test": len(task.test_records),
            "n_train": len(task.examples),
            "n_eval": len(task.eval_records),
            "labels": task.labels,
        },
        task={
            "before": scores(scored_as(metrics["before"])),
            "after": scores(scored_as(metrics["after"])),
            **tfidf_scores(metrics["tfidf"]),
        },
        test=None
        if metrics["test"] is None
        else {"after": scores(scored_as(metrics["test"]["after"])), **tfidf_scores(metrics["test"]["tfidf"])},
        forgetting=metrics["forgetting"],
        cost=cost,
        train={"loss_curve": metrics["train"]["loss_curve"], "steps": metrics["train"]["steps"]},
        versions=package_versions("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes"),
        git_revision=launch.revision,
        created=now(),
        run_name=cfg.run_name or Path(cfg.output_dir).name,
    )
    ledger.write(Path(cfg.output_dir) / "ledger.json")


def tfidf_scores(rows: dict | None) -> dict:
    """A run's TF-IDF rows as ledger task entries (tfidf = untuned on the prompt's text, as in ledger version 1)."""
    rows = rows or {}
    names = {"tfidf": "llm_text", "tfidf_full_text": "full_text"}
    names |= {"tfidf_tuned": "tuned_llm_text", "tfidf_tuned_full_text": "tuned_full_text"}
    return {entry: scores(rows.get(row)) for entry, row in names.items()}
