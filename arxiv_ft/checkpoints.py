"""Resumable training: atomic checkpoints (model, optimizer, scheduler, RNG, data position) and graceful stops.

A checkpoint is written into `step-NNNNNNNN.partial/` by every process (accelerate's `save_state`, which also
covers DeepSpeed's sharded states), then the main process writes `trainer_state.json` and the `COMPLETE` marker
and renames the folder to `step-NNNNNNNN/`. A crash at any point leaves either no folder with that name or a
`.partial` one, which `--resume auto` ignores. The data position is the optimizer step: the batch plan is a
pure function of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
# Distinct exit status of a run that stopped on a signal after saving a checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")]
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=lambda p: int(p.name.split("-")[1]))


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """`none` -> None; `auto` -> the newest complete checkpoint, if any; else a path that must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return path


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Save on every process, publish atomically on the main one, keep the newest `keep` complete checkpoints."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a crash while saving this same step
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_write(partial / STATE_FILE, json.dumps(state, indent=1) + "\n")
        _fsync_write(partial / COMPLETE, f"{step}\n")
        if final.exists():  # an earlier run reached this step; the newer save wins
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state saved with them."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


class GracefulStop:
    """Turns SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or preemption) into a flag checked per step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def should_stop(self, accelerator) -> bool:
        """True on every process if any process got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor(1 if self.received is not None else 0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max"))
