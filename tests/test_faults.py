"""The guarantees, under injected faults: run this module to see them hold.

- kill -9 at any phase of train, then the same command again: it finishes as if never interrupted (same loss curve,
  same weights); at any point of infer: every item once, the same predictions (tests/test_infer.py too).
- disk full while saving: the run stops with the error, what was complete stays complete, and once there is space
  the same command resumes to the uninterrupted result.
- a stop signal at any phase after training is honoured (checkpoint, exit 75), never swallowed.
- two identical runs at once: the second stops at once; folders that belong to another run or are not runs at all
  are refused with the reason.
- a checkpoint is never a way to run code (no pickle is loaded), and a torn one is skipped for the one before it.

Tiny random LLaMA, real processes and signals.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arxiv_ft.checkpoints import EXIT_PREEMPTED, complete_checkpoints
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train_args(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--model",
        model_dir,
        "--train-per-class",
        "2",
        "--eval-per-class",
        "1",
        "--max-seq-tokens",
        "160",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--lora-dropout",
        "0.1",
        "--log-every-steps",
        "1",
        "--checkpoint-every-steps",
        "3",
        "--eval-before",
        "false",
        "--probe-windows",
        "1",
        "--probe-mc-items",
        "14",
        "--output-dir",
        str(out),
        *extra,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited {proc.returncode} before {marker!r}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {marker!r} in {timeout} s"
        time.sleep(0.05)


def finished(out: Path) -> tuple[list[float], dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["train"]["loss_curve"], load_file(out / "adapter_model.safetensors")


def assert_same_result(a: Path, b: Path) -> None:
    curve_a, weights_a = finished(a)
    curve_b, weights_b = finished(b)
    assert curve_b == pytest.approx(curve_a, rel=1e-5)
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "straight"
    subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, check=True, capture_output=True)
    return out


# A marker in the log, and the phase a kill right after it interrupts.
PHASES = {
    "task": "labels:",  # data read and tokenised, nothing trained
    "fit": "step 5/",  # mid-epoch, after the checkpoint of step 3
    "evaluation": "step 20/20",  # training done, the final evaluation running
    "probes": "[fine-tuned]",  # evaluated, probing or saving
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_at_any_phase_of_train_then_rerun_gives_the_uninterrupted_result(
    phase, uninterrupted, tiny_model_dir, tmp_path
):
    out, log = tmp_path / "killed", tmp_path / "log.txt"
    proc = start(train_args(tiny_model_dir, out), log)
    wait_for(proc, log, PHASES[phase])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "ledger.json").exists()
    rerun = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_result(uninterrupted, out)


@pytest.mark.parametrize("phase", ["evaluation", "probes"])
def test_a_stop_signal_after_training_is_honoured_not_swallowed(phase, uninterrupted, tiny_model_dir, tmp_path):
    out, log = tmp_path / "stopped", tmp_path / "log.txt"
    proc = start(train_args(tiny_model_dir, out, "--probe-windows", "4", "--probe-mc-items", "70"), log)
    wait_for(proc, log, PHASES[phase])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-2000:]
    assert int(complete_checkpoints(out)[-1].name.split("-")[1]) == 20 and not (out / "ledger.json").exists()
    rerun = subprocess.run(
        train_args(tiny_model_dir, out, "--probe-windows", "4", "--probe-mc-items", "70"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0 and "at step 20/20" in rerun.stderr and "step 1/" not in rerun.stderr
    assert finished(out)[0] == pytest.approx(finished(uninterrupted)[0], rel=1e-5)


def test_ctrl_c_mid_training_saves_a_checkpoint_and_the_rerun_finishes_like_an_uninterrupted_run(
    uninterrupted, tiny_model_dir, tmp_path
):
    """Ctrl-C (SIGINT) is a stop signal like SIGTERM: a checkpoint and exit 75, not a traceback and lost steps."""
    out, log = tmp_path / "ctrl-c", tmp_path / "log.txt"
    proc = start(train_args(tiny_model_dir, out), log)
    wait_for(proc, log, PHASES["fit"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, log.read_text()[-2000:]
    assert "KeyboardInterrupt" not in log.read_text() and complete_checkpoints(out)
    rerun = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_result(uninterrupted, out)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_the_run_and_the_same_command_resumes_once_there_is_space(
    small_disk, uninterrupted, tiny_model_dir
):
    """2 MB holds the checkpoints (~0.55 MB each, two kept) but not the run folder's 3.5 MB tokenizer."""
    out = small_disk / "run"
    first = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert first.returncode != 0 and "No space left on device" in first.stderr
    done = complete_checkpoints(out)
    assert done and not (out / "ledger.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rerun = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_result(uninterrupted, out)


def test_a_second_identical_run_stops_at_once(tiny_model_dir, tmp_path):
    out, log = tmp_path / "busy", tmp_path / "log.txt"
    first = start(train_args(tiny_model_dir, out, "--epochs", "20"), log)
    try:
        wait_for(first, log, "labels:")
        began = time.monotonic()
        second = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert second.returncode != 0 and "in use by pid" in second.stderr
        assert time.monotonic() - began < 60  # refused before loading a model or training
    finally:
        first.kill()
        first.wait()


def test_folders_that_are_not_runs_are_refused_with_the_reason(tiny_model_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    infer = [sys.executable, "infer.py", "--model-dir", str(foreign), "--input", "x.jsonl", "--output", "o.jsonl"]
    res = subprocess.run(infer, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "not a train.py output folder: labels.txt is missing" in res.stderr
    res = subprocess.run(
        train_args(tiny_model_dir, tmp_path / "o", "--resume", str(foreign)),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "not a complete checkpoint" in res.stderr


class _Exploit:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_no_pickle_in_a_checkpoint_is_ever_loaded_and_a_torn_one_is_skipped(uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "crafted"
    shutil.copytree(uninterrupted, out)
    (out / "ledger.json").unlink()  # unfinished: --resume auto will load the newest checkpoint
    newest, previous = complete_checkpoints(out)[-1], complete_checkpoints(out)[-2]
    proof = tmp_path / "pwned"
    for folder in (newest, previous):  # what accelerate's load_state would unpickle, in both
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
            with open(folder / name, "wb") as fh:
                pickle.dump(_Exploit(str(proof)), fh)
    # A torn checkpoint: the adapter cut short after its COMPLETE marker was written (power loss).
    adapter = newest / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    res = subprocess.run(train_args(tiny_model_dir, out), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping checkpoint {newest}" in res.stderr and f"resumed from {previous}" in res.stderr
    assert not proof.exists()
    assert_same_result(uninterrupted, out)
