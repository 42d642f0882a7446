"""What both benchmarks share: the model (real or a random Llama-3.2-1B shape), the data, memory and machine facts."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/x.py` from anywhere, without installing the package

from arxiv_ft import records as rec  # noqa: E402
from arxiv_ft.data import PromptBuilder  # noqa: E402
from arxiv_ft.modeling import LLAMA_LINEAR_MODULES, load_model, load_tokenizer, resolve_model_path  # noqa: E402
from arxiv_ft.prompts import DEFAULT_TEMPLATE, get_template  # noqa: E402

ASSETS = ROOT / "arxiv_ft" / "assets"
# Dense bf16 peak FLOP/s (as train.py's table); CPUs have no agreed peak: pass --peak-tflops.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def add_model_args(parser) -> None:
    """Options every benchmark takes: which model, where, in which dtype."""
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder or smollm2-135m")
    parser.add_argument(
        "--random-llama-1b",
        action="store_true",
        help="random weights in Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied); "
        "the tokenizer stays --model's",
    )
    parser.add_argument("--random-weights", action="store_true", help="--model's architecture, random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: fp32 CPU, bf16 CUDA")
    parser.add_argument("--max-seq-tokens", type=int, default=192, help="prompt + answer token budget")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = known GPUs only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")


def set_threads(threads: int) -> None:
    # On a shared CPU, more threads than free cores makes every op wait for the slowest thread: 1 can be ~5x faster.
    if threads:
        torch.set_num_threads(threads)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32  # bf16 on CPUs without AMX is very slow
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def llama_1b_config():
    """Llama-3.2-1B's shape (random weights are fine for speed)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def build_model(args, dtype: torch.dtype, quantization_config=None):
    """The base model on args.device, optionally quantised (a random model is saved once, then loaded quantised)."""
    device_map = {"": 0} if args.device == "cuda" else "cpu"
    if not (args.random_llama_1b or args.random_weights):
        return load_model(args.model, dtype, quantization_config=quantization_config, device_map=device_map)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = llama_1b_config() if args.random_llama_1b else AutoConfig.from_pretrained(resolve_model_path(args.model))
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if quantization_config is None:
        return model
    with tempfile.TemporaryDirectory() as tmp:  # bitsandbytes quantises at load time
        model.save_pretrained(tmp)
        del model
        return load_model(tmp, dtype, quantization_config=quantization_config, device_map=device_map)


def describe_model(args) -> str:
    if args.random_llama_1b:
        return "Llama-3.2-1B shape, random weights"
    return args.model + (" (random weights)" if args.random_weights else "")


def lora_targets() -> list[str]:
    return list(LLAMA_LINEAR_MODULES)


def load_builder(model: str, max_seq_tokens: int, labels: list[str] | None = None, template: str = DEFAULT_TEMPLATE):
    """(tokenizer, PromptBuilder) with the project's default prompt and label set."""
    tokenizer = load_tokenizer(model)
    labels = labels or rec.read_labels(ASSETS / "cs-labels.txt")
    return tokenizer, PromptBuilder(tokenizer, get_template(template), labels, max_seq_tokens)


def sample_records(path: Path, labels: list[str], per_class: int, seed: int) -> list:
    """At most `per_class` papers of each label, chosen by hashed id (the project's own sampler)."""
    records = rec.check_labels(rec.read_records(path), labels, str(path))
    return rec.per_class_sample(records, per_class, seed)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> int:
    """Start a fresh peak; returns the memory in use now (CUDA: allocated bytes; CPU: RSS bytes)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux >= 4.0: writing 5 resets this process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _proc_status_kb("VmRSS") * 1024


def peak_memory(device: str) -> int:
    """Peak since reset_peak_memory (CUDA: max allocated; CPU: VmHWM, i.e. peak RSS)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kb("VmHWM") * 1024


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: lifetime peak, in kB


def peak_flops(device: str, dtype: torch.dtype, override_tflops: float) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def machine_info(device: str) -> dict:
    """Enough to tell two runs' machines apart, load average included (a shared CPU is a slower CPU)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
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
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
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


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, ["-" * w for w in widths], *rows]):
        print("  ".join(str(c).rjust(w) if i and j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths))))


def write_json(obj, path: str | None, quiet: bool = False) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")
        if not quiet:
            print(f"wrote {path}")
