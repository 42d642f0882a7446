"""The fine-tuning methods, one object each, in one table: every list of methods in the project is read from here.

A method knows which launches it can run under (the compatibility matrix, checked before any model is loaded),
how to build its trainable model from a base, how many FLOPs a trained token costs, and how to save, reload and
merge what it trained. Adding a method is one entry here (DoRA below is LoRA with one flag more).

Launches: single (one process), ddp, zero2, zero3, zero3-offload (DeepSpeed), fsdp (FSDP2, GPUs only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LAUNCHES = ("single", "ddp", "zero2", "zero3", "zero3-offload", "fsdp")


class IncompatibleLaunch(SystemExit):
    """A method / launch / device combination that cannot work, refused before any model is loaded."""


@dataclass(frozen=True)
class Method:
    """A way of fine-tuning: one entry of the methods table. The base behaviour is the whole model's (every weight
    trains; fp32 master weights, bf16 compute through mixed precision on GPUs), which FullFineTuning is; the adapter
    methods override what differs."""

    name: str = "full"
    summary: str = "every weight trains"
    adapter: bool = False  # trains adapters on a frozen base (and saves only them)
    quantized: bool = False  # the frozen base is 4-bit

    def check(self, launch: str, device: str, quant_storage: str, compute_dtype: str) -> None:
        """The compatibility matrix (method x launch x device); raise IncompatibleLaunch saying why and what instead."""
        if launch not in LAUNCHES:
            raise ValueError(f"unknown launch {launch!r}; known: {', '.join(LAUNCHES)}")
        if launch == "fsdp" and device == "cpu":
            raise IncompatibleLaunch(
                "FSDP on CPU: accelerate never applies FSDP without GPUs (it would silently train something else). "
                "Use accelerate_configs/ddp.yaml or zero3.yaml on CPU; FSDP on GPUs."
            )

    def flops_per_token(self, n_params: int, n_trainable: int) -> float:
        """Model FLOPs per trained token (attention excluded): 6N forward + backward + weight gradients."""
        return 6.0 * n_params

    def build(self, source, cfg, dtype, device, device_index: int = 0):
        """The model that trains, from the base `source`, on `device`."""
        from arxiv_ft.modeling import load_model

        model = load_model(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(device)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()  # so checkpointed blocks get gradients when the embeddings are frozen
        return self.wrap(model, cfg)

    def wrap(self, model, cfg):
        return model

    def save(self, model, folder: Path, state_dict=None) -> None:
        """Write what trained (the whole model here) as safetensors into `folder`."""
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def files(self) -> tuple[str, ...]:
        """Globs of the files `save` writes (a run folder removes stale ones of another method)."""
        return ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "config.json")

    def load(self, folder: Path, source, dtype, trust_remote_code: bool = False):
        """Reload what `save` wrote, for inference."""
        from arxiv_ft.modeling import load_model

        return load_model(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)

    def merge(self, folder: Path, source, out: Path, dtype):
        raise SystemExit(f"{folder}: a full fine-tune is already a whole model; there is no adapter to merge")


@dataclass(frozen=True)
class FullFineTuning(Method):
    """Full fine-tuning: every weight trains, and the whole model is saved."""


@dataclass(frozen=True)
class LoRA(Method):
    """LoRA: low-rank adapters on a frozen base; only the adapters train and are saved."""

    name: str = "lora"
    summary: str = "LoRA adapters on a frozen base"
    adapter: bool = True
    dora: bool = False

    def flops_per_token(self, n_params: int, n_trainable: int) -> float:
        # The backward still propagates activation gradients through every frozen layer (2N) but computes no weight
        # gradients for them: 4N + 6 x trainable.
        return 4.0 * n_params + 6.0 * n_trainable

    def wrap(self, model, cfg):
        from peft import LoraConfig, get_peft_model

        from arxiv_ft.modeling import adapted_layers

        n_layers = model.config.num_hidden_layers
        top = adapted_layers(cfg.lora_layers, n_layers)
        # Only the top layers adapt: nothing below them needs a gradient, so backward stops there.
        layers = list(range(n_layers - top, n_layers)) if top < n_layers else None
        config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets.split(","),
            task_type="CAUSAL_LM",
            use_rslora=cfg.lora_rslora,
            use_dora=self.dora,
            layers_to_transform=layers,
            layers_pattern="layers" if layers else None,
        )
        return get_peft_model(model, config)

    def save(self, model, folder: Path, state_dict=None) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def files(self) -> tuple[str, ...]:
        return ("adapter_model.safetensors", "adapter_config.json")

    def base(self, source, dtype, trust_remote_code: bool = False):
        from arxiv_ft.modeling import load_model

        return load_model(source, dtype, trust_remote_code)

    def load(self, folder: Path, source, dtype, trust_remote_code: bool = False):
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base(source, dtype, trust_remote_code), folder)

    def merge(self, folder: Path, source, out: Path, dtype):
        """Fold the adapter into a full-precision copy of its base: a deployable model folder."""
        from peft import PeftModel

        merged = PeftModel.from_pretrained(self.merge_base(folder, source, dtype), folder).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        return merged

    def merge_base(self, folder: Path, source, dtype):
        from arxiv_ft.modeling import load_model

        return load_model(source, dtype)


@dataclass(frozen=True)
class QLoRA(LoRA):
    """QLoRA: LoRA on an nf4 (double-quantised) base; the adapter merges onto the de-quantised base it saw."""

    name: str = "qlora"
    summary: str = "LoRA adapters on a 4-bit nf4 base"
    quantized: bool = True

    def check(self, launch: str, device: str, quant_storage: str, compute_dtype: str) -> None:
        super().check(launch, device, quant_storage, compute_dtype)
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

    def build(self, source, cfg, dtype, device, device_index: int = 0):
        from arxiv_ft.modeling import load_quantized, prepare_for_kbit

        model = load_quantized(source, dtype, cfg.bnb_quant_storage, device_index)
        model = prepare_for_kbit(model, cfg.gradient_checkpointing)
        model.config.use_cache = False
        return self.wrap(model, cfg)

    def base(self, source, dtype, trust_remote_code: bool = False, quant_storage: str = "uint8"):
        from arxiv_ft.modeling import load_quantized

        return load_quantized(source, dtype, quant_storage)

    def load(self, folder: Path, source, dtype, trust_remote_code: bool = False):
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base(source, dtype, quant_storage=_quant_storage(folder)), folder)

    def merge_base(self, folder: Path, source, dtype):
        # The adapter was trained against the de-quantised nf4 weights, not the original ones: merge onto those,
        # so the merged model predicts like base + adapter did.
        from arxiv_ft.modeling import dequantized_base

        return dequantized_base(source, _quant_storage(folder), dtype)


@dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA (weight-decomposed LoRA, peft's `use_dora`): LoRA for the direction, a trained magnitude per column."""

    name: str = "dora"
    summary: str = "DoRA: LoRA direction + trained magnitude, on a frozen base"
    dora: bool = True


def _quant_storage(folder: Path) -> str:
    import json

    return json.loads((Path(folder) / "train_config.json").read_text()).get("bnb_quant_storage", "uint8")


METHODS: dict[str, Method] = {m.name: m for m in (LoRA(), QLoRA(), DoRA(), FullFineTuning())}


def get_method(name: str) -> Method:
    """The method called `name`; an unknown name is an error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
