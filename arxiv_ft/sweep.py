"""Learning-rate sweeps as one command: every (method, learning rate, seed) point of a spec is a train.py run with its
own folder and ledger; running the command again skips finished points and resumes interrupted ones.

    arxiv-ft sweep sweeps/frontier-cpu.yaml --out runs/frontier --jobs 2     # locally, two runs at a time
    arxiv-ft sweep sweeps/frontier-cpu.yaml --out runs/frontier --list       # the points, one a line
    SPEC=sweeps/frontier-gpu.yaml slurm/sweep.sh                              # one Slurm array task a point

A spec (YAML):

    recipe: presets/compare/{method}.yaml   # each method's train.py preset ({method} is replaced)
    seeds: [20, 21]                         # seeds that took no part in choosing the learning rates
    methods:                                # method: the learning rates to sweep
      lora: [5.0e-4, 1.0e-3, 2.0e-3, 4.0e-3]
      full: [5.0e-5, 1.0e-4, 2.0e-4, 4.0e-4]
    options: {probe_windows: 64}            # train.py options for every point (optional)

Point i (in method, rate, seed order) trains into OUT/<method>-lr<rate>-s<seed>/; `--point i` runs that one alone
(what a Slurm array task does), `--args-of i` prints its train.py arguments.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from arxiv_ft.config import ConfigError


@dataclass(frozen=True)
class Point:
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-s{self.seed}"


def read_spec(path: str | Path) -> dict:
    """A validated sweep spec (see the module docstring); every problem names the file."""
    from arxiv_ft.methods import METHODS

    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("methods"), dict) or not spec.get("seeds"):
        raise ConfigError(f"{path}: a sweep spec needs `methods: {{method: [rates]}}` and `seeds: [...]`")
    unknown = sorted(set(spec) - {"recipe", "seeds", "methods", "options"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    for method, rates in spec["methods"].items():
        if method not in METHODS:
            raise ConfigError(f"{path}: method {method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(rates, list) or not rates or not all(isinstance(r, (int, float)) and r > 0 for r in rates):
            raise ConfigError(f"{path}: {method}: a list of positive learning rates")
    if not all(isinstance(s, int) for s in spec["seeds"]):
        raise ConfigError(f"{path}: seeds must be integers")
    return spec


def points(spec: dict) -> list[Point]:
    return [Point(m, float(lr), s) for m, rates in spec["methods"].items() for lr in rates for s in spec["seeds"]]


def train_args(spec: dict, point: Point, out: str | Path) -> list[str]:
    """The train.py arguments of one point: its recipe preset, the spec's options, then method, rate, seed, folder."""
    args = []
    if spec.get("recipe"):
        args += ["--config", spec["recipe"].format(method=point.method)]
    for key, value in (spec.get("options") or {}).items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    args += ["--method", point.method, "--lr", f"{point.lr:g}", "--seed", str(point.seed)]
    return args + ["--output-dir", str(Path(out) / point.name)]


def run_sweep(spec_path: str, out: str, jobs: int = 1, only: int | None = None, python: str = sys.executable) -> dict:
    """Run every unfinished point (or point `only`), `jobs` at a time; returns {point name: exit status or "done"}."""
    spec = read_spec(spec_path)
    todo = points(spec) if only is None else [points(spec)[only]]
    Path(out).mkdir(parents=True, exist_ok=True)
    status: dict[str, int | str] = {}
    running: list[tuple[Point, subprocess.Popen, object]] = []
    queue = [p for p in todo if not (Path(out) / p.name / "ledger.json").is_file()]
    status |= {p.name: "done" for p in todo if p not in queue}
    while queue or running:
        while queue and len(running) < jobs:
            point = queue.pop(0)
            threads = ["--cpu-threads", "1"] if jobs > 1 else []
            log = open(Path(out) / f"{point.name}.log", "ab")
            cmd = [python, "-m", "arxiv_ft.train", *train_args(spec, point, out), *threads]
            print(f"{point.name}: {shlex.join(cmd)}", flush=True)
            running.append((point, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.2)
        for point, proc, log in list(running):
            if proc.poll() is not None:
                running.remove((point, proc, log))
                log.close()
                status[point.name] = proc.returncode
                print(f"{point.name}: exit {proc.returncode}", flush=True)
    return status


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from arxiv_ft.config import parse_config
    from arxiv_ft.options import SweepConfig

    cfg = parse_config(SweepConfig, argv, __doc__, prog)
    try:
        spec = read_spec(cfg.spec)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    every = points(spec)
    if cfg.point >= len(every) or cfg.args_of >= len(every):
        raise SystemExit(f"{cfg.spec} has {len(every)} points (0 to {len(every) - 1})")
    if cfg.list:
        print("\n".join(f"{i} {p.name}" for i, p in enumerate(every)))
        return
    if cfg.args_of >= 0:
        print(shlex.join(train_args(spec, every[cfg.args_of], cfg.out)))
        return
    status = run_sweep(cfg.spec, cfg.out, cfg.jobs, cfg.point if cfg.point >= 0 else None)
    failed = {name: code for name, code in status.items() if code not in ("done", 0)}
    if failed:  # 75: stopped on a signal with a checkpoint; the same command resumes it
        raise SystemExit(f"{len(failed)} point(s) did not finish: {failed}; run the same command again to resume")


if __name__ == "__main__":
    main(sys.argv[1:])
