"""Every launch configuration trains the same model as one process; stopped runs resume exactly.

Real launches (accelerate + torchrun, gloo on CPU, DeepSpeed with DS_ACCELERATOR=cpu) of train.py on a tiny
random LLaMA. Tolerances: losses rel 1e-4 and weights atol 1e-5 — the runs differ only in reduction order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arxiv_ft.checkpoints import COMPLETE, EXIT_PREEMPTED, complete_checkpoints, find_resume
from arxiv_ft.options import TrainConfig
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(model_dir: str, method: str = "full", steps: int = 4) -> list[str]:
    lr = "1e-3" if method == "full" else "1e-2"
    return [
        "--model",
        model_dir,
        "--method",
        method,
        "--lr",
        lr,
        "--train-per-class",
        "4",
        "--eval-per-class",
        "1",
        "--max-seq-tokens",
        "160",
        "--eval-before",
        "false",
        "--max-steps",
        str(steps),
        "--lora-dropout",
        "0",
        "--eval-batch-size",
        "8",
    ]


def single(model_dir, out, method="full", extra=()):
    cmd = [
        sys.executable,
        "train.py",
        *common(model_dir, method),
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
        *extra,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text())


def accelerate_train(config: str, processes: int, *train_args: str) -> list[str]:
    """The command line of `accelerate launch` with a shipped config running train.py, on a free port."""
    launcher = [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{config}", "--num_processes"]
    return [*launcher, str(processes), "--main_process_port", str(free_port()), "train.py", *train_args]


def launch(config: str, model_dir, out, method="full", env_extra=None, extra=()):
    env = {**os.environ, **(env_extra or {})}
    cmd = [
        *accelerate_train(config, 2, *common(model_dir, method)),
        "--batch-size",
        "2",
        "--expect-processes",
        "2",
        "--output-dir",
        str(out),
        *extra,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def assert_same_run(a: dict, b: dict, dir_a: Path, dir_b: Path, weights_file: str):
    assert b["cost"]["device_count"] == 2
    assert b["train"]["loss_curve"] == pytest.approx(a["train"]["loss_curve"], rel=1e-4)
    for key in ("accuracy", "macro_f1"):
        assert b["after"]["score"][key] == pytest.approx(a["after"]["score"][key], abs=1e-9)
    wa, wb = load_file(dir_a / weights_file), load_file(dir_b / weights_file)
    assert set(wa) == set(wb) and len(wa) > 0
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    runs = {}
    for method in ("full", "lora"):
        out = tmp_path_factory.mktemp(f"single-{method}")
        runs[method] = (single(tiny_model_dir, out, method), out)
    return runs


@pytest.mark.parametrize(
    "config,env,method",
    [
        ("ddp.yaml", {"ACCELERATE_USE_CPU": "1"}, "full"),
        ("zero2.yaml", {"DS_ACCELERATOR": "cpu"}, "full"),
        ("zero3.yaml", {"DS_ACCELERATOR": "cpu"}, "full"),
        ("zero3.yaml", {"DS_ACCELERATOR": "cpu"}, "lora"),
    ],
)
def test_two_processes_match_one_process(config, env, method, reference, tiny_model_dir, tmp_path):
    ref, ref_dir = reference[method]
    out = tmp_path / "run"
    result = launch(config, tiny_model_dir, out, method, env)
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert_same_run(ref, result, ref_dir, out, weights)
    # The reloaded output evaluates like the in-memory model did (train.py scored the in-memory one).
    reloaded = subprocess.run(
        [sys.executable, "-c", RELOAD_AND_SCORE, str(out)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(reloaded.stdout.strip().splitlines()[-1]) == pytest.approx(result["after"]["score"]["accuracy"])


RELOAD_AND_SCORE = """
import json, sys
from pathlib import Path
from arxiv_ft import Classifier
from arxiv_ft.records import per_class_sample, read_records
out = Path(sys.argv[1]); cfg = json.loads((out / "train_config.json").read_text())
clf = Classifier.from_pretrained(out, device="cpu")
records = per_class_sample(list(read_records(cfg["eval_file"])), cfg["eval_per_class"], seed=0)
preds = clf.predict(records, batch_size=8)
print(json.dumps(sum(p is not None and p["label"] == r.primary for p, r in zip(preds, records)) / len(records)))
"""


def test_fsdp_on_cpu_is_refused_with_a_clear_message(tiny_model_dir, tmp_path):
    cmd = accelerate_train("fsdp.yaml", 2, *common(tiny_model_dir), "--output-dir", str(tmp_path))
    res = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0
    assert "asks for FSDP" in res.stderr


def test_two_machines_match_one_process(reference, tiny_model_dir, tmp_path):
    """Two `accelerate launch` commands with machine ranks 0 and 1 (one process each) form one DDP group."""
    ref, ref_dir = reference["full"]
    out, port = tmp_path / "run", str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            "accelerate_configs/multinode.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "train.py",
            *common(tiny_model_dir),
            "--batch-size",
            "2",
            "--expect-processes",
            "2",
            "--output-dir",
            str(out),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
    assert_same_run(ref, json.loads((out / "metrics.json").read_text()), ref_dir, out, "model.safetensors")


def run_until_signal(cmd: list[str], after_step: int, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start a run, send `sig` once it has logged `after_step`, and wait for it to stop."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the log (progress bars redraw with \r; log lines end in \n)
        lines.append(line)
        if f"step {after_step}/" in line:
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", "".join(lines) + rest)


def test_stopped_run_resumes_to_the_same_result(tiny_model_dir, tmp_path):
    args = [
        "--model",
        tiny_model_dir,
        "--method",
        "lora",
        "--lr",
        "1e-2",
        "--train-per-class",
        "2",
        "--eval-per-class",
        "1",
        "--max-seq-tokens",
        "160",
        "--eval-before",
        "false",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0.1",
        "--log-every-steps",
        "1",
        "--checkpoint-every-steps",
        "4",
    ]
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "train.py", *args, "--output-dir", str(straight)], cwd=ROOT, check=True, capture_output=True
    )
    expected = json.loads((straight / "metrics.json").read_text())["train"]
    assert expected["steps"] == 42 // 4 * 2  # 10 steps an epoch: the stop lands mid-epoch

    stopped = tmp_path / "stopped"
    cmd = [sys.executable, "train.py", *args, "--output-dir", str(stopped)]
    res = run_until_signal(cmd, after_step=6, sig=signal.SIGUSR1)
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-2000:]
    saved = complete_checkpoints(stopped)
    stop_step = int(saved[-1].name.split("-")[1])
    assert 6 <= stop_step < 10
    assert not (stopped / "metrics.json").exists()

    # A save that was cut short must be ignored by --resume auto.
    broken = saved[-1].parent / f"step-{stop_step + 1:08d}"
    broken.mkdir()
    (saved[-1].parent / f"step-{stop_step + 2:08d}.partial").mkdir()
    assert find_resume(stopped, "auto")[0] == saved[-1]

    res = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {saved[-1]} at step {stop_step}" in res.stderr
    got = json.loads((stopped / "metrics.json").read_text())["train"]
    assert got["steps"] == expected["steps"]
    assert got["loss_curve"] == pytest.approx(expected["loss_curve"], rel=1e-5)  # no step lost or repeated
    assert got["tokens_seen"] == expected["tokens_seen"]
    wa = load_file(straight / "adapter_model.safetensors")
    wb = load_file(stopped / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    # keep_checkpoints=2 prunes older ones; the broken folder is never counted as complete
    assert len(complete_checkpoints(stopped)) == 2
    assert not (broken / COMPLETE).exists()


def test_resume_refuses_a_different_config(tiny_model_dir, tmp_path):
    args = [
        "--model",
        tiny_model_dir,
        "--train-per-class",
        "2",
        "--eval-per-class",
        "1",
        "--max-seq-tokens",
        "160",
        "--eval-before",
        "false",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every-steps",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, check=True, capture_output=True)
    (tmp_path / "ledger.json").unlink()  # as if it had crashed after its last checkpoint
    res = subprocess.run([sys.executable, "train.py", *args, "--lr", "0.5"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and f"lr: {TrainConfig().lr} -> 0.5" in res.stderr  # (the default's, then the new)


def test_a_checkpoint_resumes_on_another_number_of_processes_with_the_same_global_batches(tiny_model_dir, tmp_path):
    """Stopped after step 6 of 10 on one process, finished on two (DDP): the same weights as one process alone.
    (Each step's global batch is a function of the step only; dropout is off, so the result is exact.)"""
    args = [*common(tiny_model_dir, "lora", steps=10), "--log-every-steps", "1", "--checkpoint-every-steps", "3"]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    subprocess.run(
        [sys.executable, "train.py", *args, "--batch-size", "4", "--output-dir", str(straight)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    first = run_until_signal(
        [sys.executable, "train.py", *args, "--batch-size", "4", "--output-dir", str(moved)], 7, signal.SIGUSR1
    )
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-2000:]
    cmd = [*accelerate_train("ddp.yaml", 2, *args), "--batch-size", "2", "--output-dir", str(moved)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "saved by 1 processes; the same global batches follow" in res.stderr
    want = json.loads((straight / "metrics.json").read_text())["train"]["loss_curve"]
    got = json.loads((moved / "metrics.json").read_text())["train"]["loss_curve"]
    assert got == pytest.approx(want, rel=1e-4)
    wa, wb = load_file(straight / "adapter_model.safetensors"), load_file(moved / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)


def test_deepspeed_shards_are_not_resumed_on_another_number_of_processes(tiny_model_dir, tmp_path):
    args = [*common(tiny_model_dir, "full", steps=6), "--log-every-steps", "1", "--checkpoint-every-steps", "2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [*accelerate_train("zero2.yaml", 2, *args), "--batch-size", "2", "--output-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    (tmp_path / "ledger.json").unlink()  # as if it had stopped after its last checkpoint
    one = [*accelerate_train("zero2.yaml", 1, *args), "--batch-size", "4", "--output-dir", str(tmp_path)]
    res = subprocess.run(one, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "resume with the same number" in res.stderr, res.stderr[-2000:]
