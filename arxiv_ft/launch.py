"""The launch: what `accelerate launch` gave this process, checked against what the launch config asked for and
against the method x launch x device matrix, before any data or model is read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin, set_seed

from arxiv_ft.config import to_dict
from arxiv_ft.ledger import git_revision
from arxiv_ft.methods import Method, get_method
from arxiv_ft.modeling import resolve_dtype, set_cpu_threads
from arxiv_ft.options import TrainConfig

logger = logging.getLogger("arxiv_ft")


@dataclass
class Launch:
    """What the launcher gave this process, checked: the accelerator, the launch kind, device and dtype."""

    accelerator: Accelerator
    kind: str  # a row of the compatibility matrix: single, ddp, zero2, zero3, zero3-offload, fsdp
    method: Method
    dtype: torch.dtype
    trackers: list[str] = field(default_factory=list)
    revision: str | None = None  # the package's git commit when the run started (what ran, whatever is committed later)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        """An INFO line from each machine's main process (every node's log shows its progress)."""
        if self.accelerator.is_local_main_process:
            logger.info(message)


def launch_kind(accelerator) -> str:
    """Which row of the compatibility matrix this launch is: single, ddp, zero2, zero3, zero3-offload, fsdp."""
    dt = accelerator.distributed_type
    if dt == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if int(zero.get("stage", 0)) < 3:
            return "zero2"
        offload = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        return "zero3-offload" if offload else "zero3"
    if dt == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_launch(accelerator, expect_processes: int) -> None:
    """Refuse to train something other than what the launch asked for (accelerate can fall back silently)."""
    dt = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and dt != DistributedType.FSDP:
        raise SystemExit(
            f"the launch config asks for FSDP but accelerate set up {dt.value} (it never applies FSDP on CPU): "
            "use accelerate_configs/ddp.yaml or a DeepSpeed config on CPU, FSDP on GPUs"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and dt != DistributedType.DEEPSPEED:
        raise SystemExit(f"the launch config asks for DeepSpeed but accelerate set up {dt.value}")
    world = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if world != accelerator.num_processes:
        raise SystemExit(f"WORLD_SIZE={world} but only {accelerator.num_processes} process(es) joined the group")
    if expect_processes and accelerator.num_processes != expect_processes:
        raise SystemExit(
            f"--expect-processes {expect_processes} but {accelerator.num_processes} process(es) run "
            "(on CPU, `accelerate launch --cpu --num_processes N` starts one: see accelerate_configs/ddp.yaml)"
        )


def start(cfg: TrainConfig) -> Launch:
    """Set up accelerate, check the launch and the method x launch x device cell, seed; before any data or model."""
    method = get_method(cfg.method)
    # gloo on CPU: without it accelerate + DeepSpeed miscount CPU processes (../shared/notes/cpu-stack.md).
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [],
        log_with=trackers or None,
        project_dir=str(Path(cfg.output_dir) / "logs"),
        # Regional compilation: one graph compiled once and reused by every decoder layer (a shorter cold start).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if cfg.compile else None,
    )
    check_launch(accelerator, cfg.expect_processes)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.cpu_threads)
    dtype = resolve_dtype(cfg.dtype_name, accelerator.device, trains_every_weight=not method.adapter)
    kind = launch_kind(accelerator)
    method.check(kind, accelerator.device.type, cfg.bnb_quant_storage, "bf16" if dtype == torch.bfloat16 else "fp32")
    if trackers:
        name = cfg.run_name or Path(cfg.output_dir).name
        accelerator.init_trackers("arxiv-ft", config=to_dict(cfg), init_kwargs={"wandb": {"name": name}})
    set_seed(cfg.seed)
    return Launch(accelerator, kind, method, dtype, trackers, git_revision())
