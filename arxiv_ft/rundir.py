"""A run folder: every file a training run leaves, written and read in one place.

    RUN/
      README.md                    model card (base model by Hub id, labels, prompt, scores, forgetting, cost, command)
      adapter_model.safetensors    LoRA/QLoRA/DoRA: the adapter, with adapter_config.json (base = its Hub id)
      model.safetensors            full fine-tuning: the whole model, with config.json
      classifier_head.safetensors  only for --objective cls-head
      tokenizer files              the tokenizer as trained (chat template included)
      train_config.json            the resolved training config
      labels.txt  prompt.json      the label set; the prompt spec (template id, token budget, pinned chat variables)
      base_model.json              the base: name as typed, Hub id, absolute path, revision, weights fingerprint
      metrics.json  ledger.json    everything measured; the typed record the report reads (written last)
      checkpoints/step-N/  best/   resumable checkpoints and the best evaluation so far; each loads like RUN itself
      merged/                      --merge: the adapter folded into a full model

A checkpoint, `best/` and the run itself are all `RunDir`s: `infer.py --model-dir` and `Classifier.from_pretrained`
take any of them. The method is read from `train_config.json`, never guessed from which files happen to exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from arxiv_ft.fileio import atomic_write, read_json, write_json
from arxiv_ft.prompts import PromptSpec

CONFIG, LABELS, PROMPT, BASE = "train_config.json", "labels.txt", "prompt.json", "base_model.json"
METRICS, LEDGER, CARD, HEAD = "metrics.json", "ledger.json", "README.md", "classifier_head.safetensors"
CHECKPOINTS, BEST, MERGED = "checkpoints", "best", "merged"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


class RunDir:
    """One loadable folder: a finished run, a checkpoint or `best/`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------ write

    def write_task(self, config: dict, labels: list[str], prompt: PromptSpec, base: dict) -> None:
        """The files that say what the model does: config, label set, prompt spec, base model."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG, config)
        atomic_write(self.path / LABELS, "\n".join(labels) + "\n")
        # The label set is recorded in prompt.json too: labels.txt alone, reordered or cut, would silently relabel.
        write_json(self.path / PROMPT, {**prompt.to_json(), "labels": labels})
        write_json(self.path / BASE, base)

    def write_weights(self, method, model, state_dict=None, head_state: dict | None = None) -> None:
        """What trained, as safetensors; files another method left here are removed first (a LoRA adapter beside a
        new full model would otherwise be what gets loaded)."""
        from arxiv_ft.methods import METHODS

        self.path.mkdir(parents=True, exist_ok=True)
        for other in METHODS.values():
            if other.files() != method.files():
                for pattern in other.files():
                    for stale in self.path.glob(pattern):
                        stale.unlink()
        (self.path / HEAD).unlink(missing_ok=True)
        method.save(model, self.path, state_dict=state_dict)
        if head_state is not None:
            from safetensors.torch import save_file

            tensors = {k: v.detach().cpu().contiguous() for k, v in head_state.items()}
            save_file(tensors, self.path / HEAD)

    def write_tokenizer(self, tokenizer) -> None:
        tokenizer.save_pretrained(self.path)

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path / METRICS, metrics)

    def write_card(self, text: str) -> None:
        atomic_write(self.path / CARD, text)

    def fix_adapter_base(self, hub_id: str | None) -> None:
        """peft records the base as the local path it was loaded from; other machines need its Hub id."""
        path = self.path / "adapter_config.json"
        if hub_id and path.is_file():
            config = read_json(path)
            config["base_model_name_or_path"] = hub_id
            write_json(path, config)

    # ------------------------------------------------------------------------------------------------- read

    def check(self) -> RunDir:
        """This folder has what inference needs, or SystemExit naming what is missing."""
        if not self.path.is_dir():
            raise SystemExit(f"{self.path}: no such folder")
        for name in (LABELS, PROMPT, CONFIG):
            if not (self.path / name).is_file():
                raise SystemExit(f"{self.path} is not a train.py output folder: {name} is missing")
        self._refuse_outside_links()
        from arxiv_ft import checkpoints as ckpt

        if (self.path / ckpt.COMPLETE).is_file():  # a checkpoint: its files must be the ones its manifest names
            problem = ckpt.verify(self.path)
            if problem:
                raise SystemExit(
                    f"{self.path}: {problem} (the checkpoint was changed or damaged after it was written); use another "
                    "checkpoint, best/ or the run folder"
                )
        method = self.method()
        weights = [p for p in method.files() if p.endswith(".safetensors")]
        if not any(list(self.path.glob(p)) for p in weights):
            raise SystemExit(
                f"{self.path}: trained with --method {method.name} but {weights[0]} is missing (an interrupted save? "
                "use a checkpoint under checkpoints/ or best/)"
            )
        return self

    def config(self) -> dict:
        return read_json(self.path / CONFIG)

    def labels(self) -> list[str]:
        """labels.txt, checked against the label set recorded at training (a reordered or cut file would map the
        model's answers to other labels without a word)."""
        from arxiv_ft.records import read_labels

        try:
            labels = read_labels(self.path / LABELS)
        except ValueError as exc:
            raise SystemExit(f"{exc} (the run's label file is damaged: restore it from the run)") from None
        recorded = read_json(self.path / PROMPT).get("labels")
        if recorded is not None and labels != recorded:
            raise SystemExit(
                f"{self.path / LABELS}: {len(labels)} labels ({', '.join(labels[:3])}, ...) differ from the "
                f"{len(recorded)} this model was trained with ({', '.join(recorded[:3])}, ...; recorded in "
                f"{PROMPT}): the file was changed after training; restore it"
            )
        return labels

    def _refuse_outside_links(self) -> None:
        """A task or tokenizer file that is a link to somewhere outside the folder is refused: its contents would
        become this model's labels, prompt or template."""
        root = self.path.resolve()
        for name in (LABELS, PROMPT, CONFIG, BASE, *_TOKENIZER_FILES):
            path = self.path / name
            if path.is_symlink() and root not in path.resolve().parents:
                raise SystemExit(
                    f"{path} is a link to {path.resolve()}, outside the run folder: copy the file in instead"
                )

    def prompt(self) -> PromptSpec:
        return PromptSpec.from_json(read_json(self.path / PROMPT))

    def method(self):
        from arxiv_ft.methods import get_method

        return get_method(self.config().get("method", "full"))

    def base_record(self) -> dict:
        """The base model record; folders written before base_model.json existed name it in their config."""
        if (self.path / BASE).is_file():
            return read_json(self.path / BASE)
        config = self.config()
        return {"name": config["model"], "hub_id": None, "path": None, "revision": None, "fingerprint": None}

    def base_source(self):
        from arxiv_ft.modeling import ModelSource

        return ModelSource.from_record(self.base_record(), str(self.path))

    def has_head(self) -> bool:
        return (self.path / HEAD).is_file()

    def load_head(self, device=None):
        """The classification head of a cls-head run, or None."""
        if not self.has_head():
            return None
        from safetensors.torch import load_file

        from arxiv_ft.loss import ClassificationHead

        state = load_file(self.path / HEAD)
        n_labels, hidden = state["linear.weight"].shape
        head = ClassificationHead(hidden, n_labels)
        head.load_state_dict(state)
        return head.to(device or "cpu").eval()

    def load_tokenizer(self, trust_remote_code: bool = False):
        """The tokenizer saved with this folder; a checkpoint or best/ written before they carried one takes the run's
        that holds it (`run/best`, `run/checkpoints/step-N`), never that of an unrelated folder around it; else the
        base's."""
        from arxiv_ft.modeling import load_tokenizer

        for folder in (self.path, self.owner()):
            if folder is not None and (folder / "tokenizer_config.json").is_file():
                return load_tokenizer(str(folder), trust_remote_code)
        return load_tokenizer(self.base_source(), trust_remote_code)

    def owner(self) -> Path | None:
        """The run folder this is the `best/` or a checkpoint of, when it lies where that run wrote it."""
        here = self.path.resolve()
        if here.name == BEST:
            run = here.parent
        elif here.parent.name == CHECKPOINTS and here.name.startswith("step-"):
            run = here.parent.parent
        else:
            return None
        return run if (run / CONFIG).is_file() and (run / LABELS).is_file() else None

    def load_model(self, dtype, trust_remote_code: bool = False):
        """The trained model, loaded the way its method saved it; damaged files are named, not a library traceback."""
        from safetensors import SafetensorError

        method, source = self.method(), self.base_source()
        try:
            return method.load(self.path, source, dtype, trust_remote_code)
        except (ValueError, OSError, RuntimeError, SafetensorError) as exc:  # bad JSON, a torn file, wrong shapes
            files = ", ".join(method.files())
            raise SystemExit(
                f"{self.path}: the {method.name} weights cannot be loaded ({type(exc).__name__}: {exc}); one of "
                f"{files} is damaged or not this run's: use a checkpoint under checkpoints/, best/, or retrain"
            ) from None

    def fingerprint(self) -> str:
        """What this folder's model is, by content: its task files and weights (a retrained folder differs)."""
        import hashlib

        from arxiv_ft.modeling import _fingerprint

        digest = hashlib.sha256(_fingerprint(self.path).encode())
        for name in (CONFIG, LABELS, PROMPT, BASE, HEAD, "adapter_config.json"):
            if (self.path / name).is_file():
                digest.update((self.path / name).read_bytes())
        return digest.hexdigest()[:32]

    def metrics(self) -> dict | None:
        return read_json(self.path / METRICS) if (self.path / METRICS).is_file() else None

    # --------------------------------------------------------------------------------------------- run level

    def is_finished(self) -> bool:
        return (self.path / LEDGER).is_file()

    def has_checkpoints(self) -> bool:
        root = self.path / CHECKPOINTS
        return root.is_dir() and any(root.iterdir())

    def is_ours(self) -> bool:
        """A folder a run of this project wrote (finished, or with checkpoints or its config)."""
        return self.is_finished() or self.has_checkpoints() or (self.path / CONFIG).is_file()

    def foreign_entries(self) -> list[str]:
        """What this folder holds besides the lock and tracker logs a starting run makes itself."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in (".lock", "logs"))

    def refuse_overlap(self, inputs: dict[str, str]) -> None:
        """An output folder that is, holds or lies inside what the run reads (`inputs`: option -> path, such as the
        base model folder and the data) is refused, before anything is written there: saving a run into its base
        model's folder deleted the base's weights."""
        for option, path in inputs.items():
            if path and overlaps(self.path, Path(path)):
                raise SystemExit(
                    f"--output-dir {self.path} overlaps {option} {path}: a run folder must not be, hold or lie inside "
                    "what the run reads; choose another --output-dir"
                )

    def prepare(self, resume: str, overwrite: bool) -> None:
        """Refuse to mix two runs in one folder, or to write over what is not a run; with `overwrite`, clear this
        project's files of the old run first (and nothing else).

        A finished run is never overwritten silently (its metrics and ledger would be lost), and `--resume none`
        into a folder with checkpoints would rotate the old run's checkpoints and the new run's together.
        """
        if overwrite:
            self.clear()
            return
        foreign = self.foreign_entries()
        if foreign and not self.is_ours():
            raise SystemExit(
                f"--output-dir {self.path} is not empty and holds no run of arxiv-ft ({', '.join(foreign[:5])}"
                + (", ..." if len(foreign) > 5 else "")
                + "): choose an empty or new folder, or pass --overwrite-output-dir (it removes only the files runs "
                "write, such as README.md, config.json and the tokenizer files)"
            )
        if self.is_finished():
            raise SystemExit(
                f"{self.path} holds a finished run ({LEDGER}); choose another --output-dir, or pass "
                "--overwrite-output-dir to replace it"
            )
        if resume == "none" and self.has_checkpoints():
            raise SystemExit(
                f"{self.path} holds checkpoints of an earlier run and --resume none was given; use --resume auto to "
                "continue it, another --output-dir, or --overwrite-output-dir to start over"
            )

    def clear(self) -> None:
        """Remove what a run of this project wrote here (and nothing else)."""
        from arxiv_ft.methods import METHODS

        names = {CONFIG, LABELS, PROMPT, BASE, METRICS, LEDGER, CARD, HEAD, *_TOKENIZER_FILES}
        for method in METHODS.values():
            for pattern in method.files():
                names.update(p.name for p in self.path.glob(pattern))
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        for sub in (CHECKPOINTS, BEST, MERGED):
            shutil.rmtree(self.path / sub, ignore_errors=True)


def overlaps(a: Path, b: Path) -> bool:
    """`a` and `b` are the same path, or one lies inside the other (symlinks resolved)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def read_train_config(folder: str | Path) -> dict:
    """A run folder's resolved training config."""
    return json.loads((Path(folder) / CONFIG).read_text())
