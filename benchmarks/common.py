"""What the benchmarks share: a random model folder in a given shape, the papers, memory resets, child processes,
the machine's description and the tables. Everything else (dtype, peak FLOP/s, FLOPs per token, memory) is read
from the project, so a benchmark measures what train.py and infer.py run."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from anywhere, without installing the package

from arxiv_ft import records as rec  # noqa: E402
from arxiv_ft.modeling import load_tokenizer, resolve_model_path  # noqa: E402

ASSETS = ROOT / "arxiv_ft" / "assets"


def add_model_args(parser) -> None:
    """Options every benchmark takes: which model, in which dtype, on how many CPU threads."""
    parser.add_argument("--model", default="smollm2-135m", help="hub id (cached), local folder or smollm2-135m")
    parser.add_argument(
        "--random-llama-1b",
        action="store_true",
        help="random weights in Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied); "
        "the tokenizer stays --model's",
    )
    parser.add_argument("--random-weights", action="store_true", help="--model's architecture, random weights")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="as train.py's --dtype")
    parser.add_argument("--max-seq-tokens", type=int, default=192, help="prompt + answer token budget")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = known GPUs only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the project's rule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")


LLAMA_1B = "meta-llama/Llama-3.2-1B-Instruct"
# A tiny decoder for CPU checks: the same architecture, 2 layers of width 64.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=16)


def llama_1b_config(tokenizer, tiny: bool = False):
    """Llama-3.2-1B-Instruct's config as the project knows it (arxiv_ft.modeling.known_config: hidden 2048, 16 layers,
    32 query / 8 KV heads, intermediate 8192, vocab 128256, tied, RoPE theta 500000), or tiny shapes with the
    tokenizer's vocabulary; the special ids are the tokenizer's."""
    from arxiv_ft.modeling import known_config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids.update(pad_token_id=tokenizer.pad_token_id)
    shape = dict(TINY_SHAPE, num_key_value_heads=2, vocab_size=len(tokenizer)) if tiny else {}
    config = known_config(LLAMA_1B, **ids, **shape)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the vocabulary {config.vocab_size}")
    return config


def write_random_model(folder: Path, config, tokenizer, dtype: torch.dtype, seed: int = 0) -> Path:
    """A model folder (safetensors + tokenizer) with random weights in `config`'s shape: what --model can name.

    Built on the GPU when there is one (initialising 1.2B weights on a CPU takes minutes)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def model_path(args, workdir: Path) -> str:
    """The folder the benchmark loads: --model itself, or (with --random-*) a random copy written under `workdir`."""
    if not (args.random_llama_1b or args.random_weights):
        return args.model
    from transformers import AutoConfig

    tokenizer = load_tokenizer(args.model)
    if args.random_llama_1b:
        config = llama_1b_config(tokenizer)
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    return str(write_random_model(workdir / "random-model", config, tokenizer, torch.bfloat16, args.seed))


def describe_model(args) -> str:
    if args.random_llama_1b:
        return f"Llama-3.2-1B shape, random weights, tokenizer of {args.model}"
    return args.model + (" (random weights)" if args.random_weights else "")


def sample_records(path: Path, labels: list[str], per_class: int, seed: int) -> list:
    """At most `per_class` papers of each label, chosen by hashed id (the project's own sampler)."""
    records = rec.check_labels(rec.read_records(path), labels, str(path))
    return rec.per_class_sample(records, per_class, seed)


def sync(device) -> None:
    """Wait for the GPU, so that a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    """Start a fresh peak for arxiv_ft.metrics.peak_memory_bytes (CUDA: max allocated; CPU: peak RSS)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets this process's peak RSS (VmHWM, and getrusage's ru_maxrss) to its RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str, str]:
    """Run `cmd` in its own process group; (exit status or None if it ran past `timeout_s`, stdout, stderr).

    On a timeout the whole group is killed: `accelerate launch` leaves its workers behind otherwise."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True, cwd=ROOT)
        try:
            code = proc.wait(timeout=None if math.isinf(timeout_s) else max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


class Deadline:
    """A wall-clock budget shared by every part of a run (None: no limit)."""

    def __init__(self, seconds: float | None, started: float | None = None):
        self.end = None if seconds is None else (started or time.time()) + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.time()


def machine_info(device) -> dict:
    """Enough to tell two runs' machines apart, load average included (a shared CPU is a slower CPU)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "deepspeed", "datasets"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln
        ]
        cpu = names[0] if names else cpu
    cuda = torch.device(device).type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "versions": versions,
    }


def fmt(value, spec: str = ".1f", missing: str = "—") -> str:
    """`value` formatted (a trailing % or x in `spec` is appended literally), or "—" when there is none."""
    suffix = spec[-1] if spec[-1] in "%x" else ""
    return missing if value is None else format(value, spec.rstrip("%x")) + suffix


def markdown_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A GitHub markdown table; columns whose index is in `right` are right-aligned (numbers)."""
    cells = [header, *rows]
    widths = [max(len(str(row[j])) for row in cells) for j in range(len(header))]
    rule = ["-" * (w - 1) + ":" if j in right else "-" * w for j, w in enumerate(widths)]
    lines = []
    for row in [header, rule, *rows]:
        padded = [str(c).rjust(w) if j in right else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(padded) + " |")
    return "\n".join(lines)


def write_json(obj, path: str | Path | None, quiet: bool = False) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")
        if not quiet:
            print(f"wrote {path}", file=sys.stderr)
