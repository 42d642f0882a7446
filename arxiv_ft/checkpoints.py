"""Resumable training: atomic, verified checkpoints that are also loadable run folders, and graceful stops.

A checkpoint holds what trains (a LoRA/DoRA/QLoRA adapter, or the whole model for full fine-tuning), the optimizer
state, the training state and the run's task files (config, labels, prompt, base model), so `infer.py --model-dir`
and `Classifier.from_pretrained` take it as they take the finished run. Everything is safetensors and JSON: loading
a checkpoint runs no pickle. (DeepSpeed and FSDP keep their sharded states in their own format, written by
accelerate's `save_state`; those are DeepSpeed's/torch's pickles, so resume only from folders you wrote.)

Writing: every file goes into `step-NNNNNNNN.partial/`; the main process fsyncs them, writes `COMPLETE` (a manifest
of each file's size and SHA-256) and renames the folder to `step-NNNNNNNN/`. Resuming (`find_resume`) takes the
newest checkpoint whose files match its manifest; a torn one (power loss after the marker) is skipped with a
warning and the one before it is used. The data position is the optimizer step: the batch plan, learning rate and
dropout seeds are pure functions of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch

from arxiv_ft.fileio import atomic_write, file_digest, fsync_dir, fsync_tree, read_json, write_json

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
ACCELERATE_STATE = "accelerate_state"  # DeepSpeed/FSDP sharded states
# Distinct exit status of a run that stopped on a signal after saving a checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
_HASH_LIMIT = 2 << 30  # hash files up to 2 GiB (an 8B full fine-tune's shards are sized, not hashed)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints with a COMPLETE marker, oldest first (not yet verified)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("step-*"):
        if path.name.endswith(".partial"):
            continue
        if not re.fullmatch(r"step-\d+", path.name) or not path.is_dir():  # a user's copy such as step-latest
            logger.warning("%s: not a checkpoint of this project (step-NUMBER): ignored", path)
            continue
        if (path / COMPLETE).is_file():
            found.append(path)
    return sorted(found, key=_step_of)


def _manifest(folder: Path) -> dict:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE):
        size = path.stat().st_size
        files[str(path.relative_to(folder))] = {
            "bytes": size,
            "sha256": file_digest(path) if size <= _HASH_LIMIT else None,
        }
    return files


def verify(folder: Path) -> str | None:
    """None if every file of the checkpoint matches its COMPLETE manifest, else what is wrong."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {COMPLETE} marker ({exc})"
    for name, want in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if want.get("sha256") and file_digest(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resume(output_dir: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try, best first: `none` -> none; `auto` -> the complete ones, newest first; else the path."""
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise SystemExit(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return [path]


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (for safetensors) plus JSON metadata (hyper-parameters, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `optimizer_tensors` saved."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def publish(partial: Path, final: Path, step: int) -> Path:
    """fsync a written checkpoint, write its manifest marker, and rename it into place (main process)."""
    fsync_tree(partial)
    atomic_write(partial / COMPLETE, json.dumps({"step": step, "files": _manifest(partial)}, indent=1) + "\n")
    if final.exists():  # an earlier run reached this step; the newer save wins
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)
    return final


def rotate(output_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(folder: Path, state: dict) -> None:
    write_json(folder / STATE_FILE, state)


def read_state(folder: Path) -> dict:
    return read_json(folder / STATE_FILE)


def save_tensors_atomically(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


class GracefulStop:
    """Turns SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or preemption) and Ctrl-C (SIGINT) into a flag
    checked per step: the run saves a checkpoint and exits 75. A second Ctrl-C aborts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, install: bool = True):
        self.received: int | None = None
        self._previous = {}
        if install:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again aborts)")
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were there before (a Python caller's own)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_stop(self, accelerator) -> bool:
        """True on every process if any process got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor(1 if self.received is not None else 0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max"))
