"""slurm/*.sbatch and slurm/sweep.sh on a real Slurm cluster: two nodes, each in its own network namespace.

tests/slurm/cluster.sh brings up slurmctld and two slurmd (c1, c2) on this machine; the tests submit the project's
own scripts with the tiny random LLaMA on CPU (CPU=1: gloo) and check what the jobs wrote. Needs root and the
Debian packages slurmctld slurmd slurm-client munge; skipped without them, failed without them when CI is set.
Tolerances as in tests/test_distributed.py: the runs differ only in reduction order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arxiv_ft.checkpoints import complete_checkpoints
from tests.conftest import ASSETS, ROOT
from tests.test_distributed import assert_same_run, common

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
STEPS = 40  # enough that a stop signal sent after step 3 lands mid-training (steps take ~0.1-0.3 s here)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Every job gets a short limit; the USR1 warning (the scripts' default lead is minutes) is moved to its last
# minute, so that no job here gets one from the clock, only from the tests.
# What a job asks of this 2-core, 4 GB-a-node test cluster (the scripts default to -c 8 and tens of GB).
LIMITS = ["--time=8", "--signal=B:USR1@60", "--cpus-per-task=2", "--mem=3500"]


def train_args(model_dir: str, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        *common(model_dir, "full", STEPS),
        "--log-every-steps",
        "1",
        "--batch-size",
        str(batch_size),
        "--output-dir",
        str(out),
        *extra,
    ]


def missing_requirements() -> str | None:
    if not shutil.which("slurmctld"):
        return "slurmctld not installed (apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the test cluster needs root (network namespaces, slurmd as root)"
    for tool in ("ip", "nsenter", "unshare", "munged", "sbatch"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return None


class Cluster:
    """Submit and watch jobs on the test cluster."""

    def __init__(self, base: Path):
        self.base = base
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # pytest may itself run in a job
        venv = sys.prefix if sys.prefix != sys.base_prefix else ""
        env.update(
            SLURM_CONF=str(base / "slurm.conf"),
            VENV=venv,
            CPU="1",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        )
        self.env = env

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(map(str, cmd)), cwd=ROOT, env=self.env, capture_output=True, text=True, **kw)

    def submit(self, script: str, sbatch_opts: list[str], args: list[str], env: dict | None = None) -> str:
        res = subprocess.run(
            ["sbatch", "--parsable", *LIMITS, *sbatch_opts, script, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, log: Path | None = None, timeout: float = 300) -> dict:
        """Wait until the job has ended for good (a requeued job passes through PENDING again)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id)
        pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout} s\n{tail(log)}")

    def wait_for(self, job_id: str, ready, what: str, log: Path | None, timeout: float = 240) -> None:
        """Wait until `ready()` is true while the job runs."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            state = self.job(job_id).get("JobState")
            if state in FINAL_STATES:
                pytest.fail(f"job {job_id} ended ({state}) before {what}\n{tail(log)}")
            time.sleep(0.2)
        self.run("scancel", job_id)
        pytest.fail(f"job {job_id}: no {what} after {timeout} s\n{tail(log)}")


def read_log(log: Path | None) -> str:
    return log.read_text(errors="replace") if log is not None and log.exists() else ""


def tail(log: Path | None, n: int = 4000) -> str:
    return read_log(log)[-n:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the Slurm test cluster: {reason}")
        pytest.skip(reason)
    # Not pytest's tmp_path: its folders are 0700, and munged wants o+x on every folder above its socket.
    base = Path(tempfile.mkdtemp(prefix="arxiv-ft-slurm-"))
    base.chmod(0o755)
    try:
        up = subprocess.run([str(CLUSTER_SH), "up", str(base)], capture_output=True, text=True, timeout=120)
        if up.returncode != 0:
            logs = "".join(p.read_text(errors="replace")[-1500:] for p in sorted((base / "log").glob("*.log")))
            pytest.fail(f"cluster.sh up failed:\n{up.stderr}\n{logs}")
        yield Cluster(base)
    finally:
        subprocess.run([str(CLUSTER_SH), "down", str(base)], capture_output=True, text=True, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One process, no Slurm, global batch 8: what every 2-process job here must reproduce."""
    out = tmp_path_factory.mktemp("slurm-reference")
    cmd = [sys.executable, "train.py", *train_args(tiny_model_dir, out, 8)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text()), out


def test_up_removes_the_network_a_killed_cluster_left(tmp_path):
    """A run killed before its `down` (the sandbox restarted mid-CI) leaves the bridge and namespaces and no daemons:
    the next `up` must clear them, not fail every Slurm test. Runs before the module's cluster comes up."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    subprocess.run(["ip", "link", "add", "slbr0", "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", "slnode1"], check=True)
    base = Path(tempfile.mkdtemp(prefix="arxiv-ft-slurm-"))
    base.chmod(0o755)
    try:
        up = subprocess.run([str(CLUSTER_SH), "up", str(base)], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        assert "removing a dead test cluster's network" in up.stderr
        env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, env=env, timeout=30)
        assert sinfo.stdout.strip() == "2", sinfo.stderr
    finally:
        subprocess.run([str(CLUSTER_SH), "down", str(base)], capture_output=True, text=True, timeout=180)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", "slnode1"], capture_output=True)
        subprocess.run(["ip", "link", "del", "slbr0"], capture_output=True)
    assert "slnode" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_two_nodes_in_two_namespaces_train_like_one_process(cluster, reference, tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    args = train_args(tiny_model_dir, out, 4, "--expect-processes", "2")
    job = cluster.submit("slurm/train-multinode.sbatch", ["--nodes=2", f"--output={log}"], args)
    info = cluster.wait(job, log)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", tail(log)

    # One task per node, each computed its own machine rank; c1 (the rendezvous host) is rank 0.
    tasks = re.findall(r"task: host=(\S+) machine_rank=(\d+) of 2 netns=(\S+)", text)
    assert sorted((host, rank) for host, rank, _ in tasks) == [("c1", "0"), ("c2", "1")], text[-3000:]
    assert len({netns for _, _, netns in tasks}) == 2  # two network namespaces: traffic went over the bridge
    assert "rendezvous=c1:" in text
    # accelerate prints on each node's local main process: train.py ran to the end on both nodes.
    assert text.count(f"step {STEPS}/{STEPS} loss") == 2

    ref, ref_dir = reference
    assert_same_run(ref, json.loads((out / "metrics.json").read_text()), ref_dir, out, "model.safetensors")


def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, reference, tiny_model_dir, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    args = train_args(tiny_model_dir, out, 4, "--expect-processes", "2")
    job = cluster.submit(
        "slurm/train.sbatch", ["--cpus-per-task=2", f"--output={log}"], args, env={"NPROC_PER_NODE": "2"}
    )
    cluster.wait_for(job, lambda: "\nstep 3/" in read_log(log), "step 3", log)
    # What Slurm does `--signal=B:USR1@T` before the time limit: signal the batch shell only.
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    info = cluster.wait(job, log, timeout=400)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["Restarts"] == "1"

    stops = re.findall(r"stopped by signal after step (\d+); checkpoint saved", text)
    assert len(stops) == 1, text[-3000:]
    stop_step = int(stops[0])
    assert 3 <= stop_step < STEPS  # mid-training
    assert "requeueing job" in text and "SLURM_RESTART_COUNT=1" in text
    assert f"/checkpoints/step-{stop_step:08d} at step {stop_step}/{STEPS}" in text  # "resumed from ..."
    # The run checkpoints every 10% and once more when training ends, whatever follows.
    assert complete_checkpoints(out)[-1].name == f"step-{STEPS:08d}"

    got = json.loads((out / "metrics.json").read_text())
    assert got["train"]["steps"] == STEPS and len(got["train"]["loss_curve"]) == STEPS  # no step lost or repeated
    ref, ref_dir = reference
    assert_same_run(ref, got, ref_dir, out, "model.safetensors")  # the same as the uninterrupted run


@pytest.mark.skipif(not (ROOT / "infer.py").exists(), reason="infer.py not available")
def test_sharded_inference_over_two_nodes_survives_a_requeue(cluster, tiny_model_dir, tmp_path):
    n = 300
    src = tmp_path / "papers.jsonl"
    with open(ASSETS / "cs-train-sample.jsonl", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(n)]
    src.write_text("".join(lines), encoding="utf-8")
    ids = [json.loads(line)["id"] for line in lines]
    out, log = tmp_path / "preds" / "preds.jsonl", tmp_path / "job.out"
    args = ["--model", tiny_model_dir, "--labels", str(ASSETS / "cs-labels.txt"), "--input", str(src)]
    args += ["--output", str(out), "--batch-size", "2", "--window-batches", "1", "--progress", "false"]
    job = cluster.submit("slurm/infer.sbatch", ["--nodes=2", f"--output={log}"], args)

    def part_lines() -> int:
        return sum(p.read_bytes().count(b"\n") for p in out.parent.glob(f"{out.name}.part-*"))

    cluster.wait_for(job, lambda: part_lines() >= 20, "20 predictions", log)
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    info = cluster.wait(job, log)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["Restarts"] == "1" and "SLURM_RESTART_COUNT=1" in text
    assert {h for h in re.findall(r"task: host=(\S+) machine_rank", text)} == {"c1", "c2"}

    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    assert 0 < summary["this_run"]["already_done_at_start"] < n  # stopped mid-run, and the restart resumed
    assert summary["this_run"]["world_size"] == 2
    # Every input item exactly once: in the merged output and rejects, and in the part files (none redone).
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in out.with_name(out.name + ".rejects.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in preds + rejects) == list(range(n))
    assert all(p["id"] == ids[p["index"]] for p in preds)
    parts = [json.loads(line)["index"] for p in out.parent.glob(f"{out.name}.part-*") for line in open(p)]
    assert sorted(parts) == list(range(n))


def test_sweep_submits_runs_and_a_report_after_them(cluster, tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    env = {
        **cluster.env,
        "SWEEP_DIR": str(sweep),
        "METHODS": "lora full",
        "SEEDS": "0",
        "BASELINE": "1",
        "BASELINE_ARGS": "--train-per-class 4 --eval-per-class 1",
        "SBATCH_ARGS": " ".join(LIMITS),
    }
    args = ["--model", tiny_model_dir, "--train-per-class", "4", "--eval-per-class", "1", "--max-seq-tokens", "160"]
    args += ["--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8"]
    res = subprocess.run(["slurm/sweep.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    runs = dict(re.findall(r"^(\S+): job (\d+)$", res.stdout, re.M))
    assert set(runs) == {"lora-seed0", "full-seed0", "tfidf-svm-seed0"}
    report_job = re.search(r"^report: job (\d+) \(after jobs ([\d:]+)\)", res.stdout, re.M)
    assert report_job and set(report_job.group(2).split(":")) == set(runs.values())

    info = cluster.wait(report_job.group(1), next(iter(sweep.glob("logs/report-*.out")), None), timeout=400)
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(sweep.glob("logs/*.out")))
    assert info["JobState"] == "COMPLETED", logs
    for run, job in runs.items():
        assert cluster.job(job)["JobState"] == "COMPLETED", (run, logs)
    for run in ("lora-seed0", "full-seed0"):
        assert json.loads((sweep / run / "metrics.json").read_text())["train"]["steps"] == 2
    assert (sweep / "report" / "report.md").is_file()
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    assert len(summary["runs"]) >= 1  # the TF-IDF ledger at least; train.py runs too once they write ledgers


def test_a_sweep_spec_runs_as_one_array_job_with_the_local_sweeps_folders(cluster, tiny_model_dir, tmp_path):
    """SPEC=... slurm/sweep.sh: one array task of train.sbatch a point, the folders `arxiv-ft sweep` uses locally;
    submitted again, every task finds its point finished and ends at once."""
    import yaml

    sweep = tmp_path / "sweep"
    options = {"model": tiny_model_dir, "train_per_class": 4, "eval_per_class": 1, "test_per_class": 1}
    options |= {"max_seq_tokens": 160, "max_steps": 2, "batch_size": 4, "eval_batch_size": 8, "probes": False}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"seeds": [5], "methods": {"lora": [1.0e-2, 3.0e-2]}, "options": options}))
    env = {**cluster.env, "SWEEP_DIR": str(sweep), "SPEC": str(spec), "SBATCH_ARGS": " ".join(LIMITS)}

    def submit() -> str:
        res = subprocess.run(["slurm/sweep.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert re.search(r"^points: job \d+ \(array 0-1: lora-lr0.01-s5 lora-lr0.03-s5\)$", res.stdout, re.M)
        report_job = re.search(r"^report: job (\d+)", res.stdout, re.M).group(1)
        info = cluster.wait(report_job, None, timeout=400)
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(sweep.glob("logs/*.out")))
        assert info["JobState"] == "COMPLETED", logs
        return logs

    submit()
    for name in ("lora-lr0.01-s5", "lora-lr0.03-s5"):
        ledger = json.loads((sweep / name / "ledger.json").read_text())
        assert ledger["train"]["steps"] == 2 and ledger["config"]["lr"] == float(name.split("lr")[1].split("-")[0])
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/ledger.json")}
    logs = submit()
    assert logs.count("is finished") >= 2 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (sweep / "report" / "report.md").is_file()
