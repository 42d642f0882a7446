"""Resumable training: atomic, verified checkpoints that are also loadable run folders, and graceful stops.

A checkpoint holds what trains (a LoRA/DoRA/QLoRA adapter, or the whole model for full fine-tuning), the optimizer
state, the training state and the run's task files (config, labels, prompt, base model), so `infer.py --model-dir`
and `Classifier.from_pretrained` take it as they take the finished run. Everything is safetensors and JSON: loading
a checkpoint runs no pickle. (DeepSpeed and FSDP keep their sharded states in their own format, written by
accelerate's `save_state`; those are DeepSpeed's/torch's pickles, so resume only from folders you wrote.)

Writing: every file goes into `step-NNNNNNNN.partial/`; the main process fsyncs them, writes `COMPLETE` (a manifest
of each file's size and SHA-256) and renames the folder to `step-NNNNNNNN/`. Resuming (`find_resume`) takes the
newest checkpoint whose files match its manifest; a torn one (power loss after the marker) is skipped with a
warning and the one before it is used. The data position is the optimizer step: the batch plan, learning rate and
dropout seeds are pure functions of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from arxiv_ft.fileio import atomic_write, file_digest, fsync_dir, fsync_tree, read_json, write_json

if TYPE_CHECKING:
    from arxiv_ft.fit import TrainState

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
ACCELERATE_STATE = "accelerate_state"  # DeepSpeed/FSDP sharded states
# Distinct exit status of a run that stopped on a signal after saving a checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
_HASH_LIMIT = 2 << 30  # hash files up to 2 GiB (an 8B full fine-tune's shards are sized, not hashed)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints with a COMPLETE marker, oldest first (not yet verified)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.glob("step-*"):
        if path.name.endswith(".partial"):
            continue
        if not re.fullmatch(r"step-\d+", path.name) or not path.is_dir():  # a user's copy such as step-latest
            logger.warning("%s: not a checkpoint of this project (step-NUMBER): ignored", path)
            continue
        if (path / COMPLETE).is_file():
            found.append(path)
    return sorted(found, key=_step_of)


def _manifest(folder: Path) -> dict:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE):
        size = path.stat().st_size
        files[str(path.relative_to(folder))] = {
            "bytes": size,
            "sha256": file_digest(path) if size <= _HASH_LIMIT else None,
        }
    return files


def verify(folder: Path) -> str | None:
    """None if every file of the checkpoint matches its COMPLETE manifest, else what is wrong."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {COMPLETE} marker ({exc})"
    for name, want in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if want.get("sha256") and file_digest(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resume(output_dir: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try, best first: `none` -> none; `auto` -> the complete ones, newest first; else the path."""
    if resume == "none":
        return []
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise SystemExit(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return [path]


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (for safetensors) plus JSON metadata (hyper-parameters, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `optimizer_tensors` saved."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def publish(partial: Path, final: Path, step: int) -> Path:
    """fsync a written checkpoint, write its manifest marker, and rename it into place (main process)."""
    fsync_tree(partial)
    atomic_write(partial / COMPLETE, json.dumps({"step": step, "files": _manifest(partial)}, indent=1) + "\n")
    if final.exists():  # an earlier run reached this step; the newer save wins
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)
    return final


def rotate(output_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(folder: Path, state: dict) -> None:
    write_json(folder / STATE_FILE, state)


def read_state(folder: Path) -> dict:
    return read_json(folder / STATE_FILE)


def save_tensors_atomically(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


class GracefulStop:
    """Turns SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or preemption) and Ctrl-C (SIGINT) into a flag
    checked per step: the run saves a checkpoint and exits 75. A second Ctrl-C aborts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, install: bool = True):
        self.received: int | None = None
        self._previous = {}
        if install:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again aborts)")
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were there before (a Python caller's own)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_stop(self, accelerator) -> bool:
        """True on every process if any process got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor(1 if self.received is not None else 0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max"))


# ------------------------------------------------------------------------------------------- a run's checkpoints
# What a training run saves and restores: its weights (run folders, checkpoints, best/), the optimizer state, and
# resumption. `run` is the training's context (phases.Run: cfg, launch, task, trainable, setup).

RESUMABLE_CHANGES = {
    "batch_size",  # with grad_accum_steps and the process count: only their product (checked) must stay
    "grad_accum_steps",
    "resume",
    "output_dir",
    "overwrite_output_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_mode",
    "expect_processes",
    "report_to",
    "run_name",
    "cpu_threads",
    "push_to_hub",
    "merge",
}


def resume(run) -> tuple[TrainState, dict | None]:
    """The newest usable checkpoint's state (model and optimizer restored) and its zero-shot scores, or a fresh
    state."""
    from arxiv_ft.config import to_dict
    from arxiv_ft.fit import TrainState, schedule

    cfg, launch, setup = run.cfg, run.launch, run.setup
    for path in find_resume(cfg.output_dir, cfg.resume):
        problem = verify(path)
        if problem:
            launch.log(f"skipping checkpoint {path}: {problem}")
            continue
        saved = read_state(path)
        check_resumable(saved.get("config", {}), to_dict(cfg))
        global_batch = saved.get("global_batch", setup.plan.step_size)
        if global_batch != setup.plan.step_size:
            world = launch.accelerator.num_processes
            raise SystemExit(
                f"{path} was trained with {global_batch} examples per optimizer step; this launch makes "
                f"{setup.plan.step_size} ({cfg.batch_size} per micro-batch x {world} processes x "
                f"{cfg.grad_accum_steps} accumulation steps): choose --batch-size / --grad-accum-steps so the "
                "product is the same, and the same global batches follow"
            )
        if saved.get("format") == "accelerate" and saved.get("world_size") != launch.accelerator.num_processes:
            raise SystemExit(
                f"{path} holds {saved.get('world_size')} DeepSpeed/FSDP shards, this launch has "
                f"{launch.accelerator.num_processes} processes: resume with the same number (DeepSpeed cannot "
                "re-shard them), or from a checkpoint of a DDP/single-process run"
            )
        load_checkpoint(run, path, saved)
        state = TrainState.from_json(saved["state"])
        setup.scheduler = schedule(cfg, setup.optimizer, setup.plan.steps, state.step)  # positioned at the step
        changed = saved.get("world_size") != launch.accelerator.num_processes
        launch.log(
            f"resumed from {path} at step {state.step}/{setup.plan.steps}"
            + (f" (saved by {saved.get('world_size')} processes; the same global batches follow)" if changed else "")
        )
        return state, saved.get("before")
    return TrainState(), None


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint made with a different training configuration."""
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise SystemExit(
            f"checkpoint was made with a different config ({details}); use --resume none or a new output dir"
        )


def _uses_accelerate_state(acc) -> bool:
    from accelerate import DistributedType

    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _gathered_state_dict(acc, train_model) -> dict | None:
    """Full weights where they exist only sharded (ZeRO-3, FSDP2): every rank takes part, the main one gets them.

    (FSDP2's parameters are DTensors; `save_pretrained` on them fails, their gathered state dict saves.)"""
    from accelerate import DistributedType

    plugin = acc.state.deepspeed_plugin
    if (plugin is not None and plugin.zero_stage == 3) or acc.distributed_type == DistributedType.FSDP:
        full = acc.get_state_dict(train_model)
        return {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
    return None


def save_weights(run, folder: Path, with_tokenizer: bool = True) -> None:
    """Write a loadable run folder's weights and task files into `folder` (every process calls this)."""
    from arxiv_ft.config import to_dict
    from arxiv_ft.modeling import register_in_hub_cache
    from arxiv_ft.rundir import RunDir

    cfg, launch, task, trainable, setup = run.cfg, run.launch, run.task, run.trainable, run.setup
    acc = launch.accelerator
    state_dict = _gathered_state_dict(acc, setup.train_model)
    if acc.is_main_process:
        out = RunDir(folder)
        model = acc.unwrap_model(trainable.model)
        head = trainable.head.state_dict() if trainable.head is not None else None
        if state_dict is not None and head is not None:
            head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
        out.write_weights(launch.method, model, state_dict=state_dict, head_state=head)
        out.write_task(to_dict(cfg), task.labels, task.prompt, task.source.record())
        if with_tokenizer:  # the run and best/ (the folder people copy out) carry their own tokenizer and template;
            out.write_tokenizer(task.tokenizer)  # a checkpoint reads its run's (RunDir.owner), and stays small
        hub_id = task.source.hub_id()
        out.fix_adapter_base(hub_id)
        if hub_id and launch.method.adapter:  # so plain peft finds the base by that id offline, here
            register_in_hub_cache(task.source.path(), hub_id)


def save_checkpoint(run, state: TrainState, before: dict | None) -> Path:
    """A resumable, loadable checkpoint of `state.step` (see arxiv_ft/checkpoints.py)."""
    from safetensors.torch import save_file

    from arxiv_ft.config import to_dict

    cfg, launch, setup = run.cfg, run.launch, run.setup
    acc = launch.accelerator
    root = checkpoint_root(cfg.output_dir)
    partial, final = root / f"step-{state.step:08d}.partial", root / f"step-{state.step:08d}"
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a crash while saving this same step
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    save_weights(run, partial, with_tokenizer=False)
    sharded = _uses_accelerate_state(acc)
    if sharded:
        acc.save_state(str(partial / ACCELERATE_STATE))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not sharded:
            tensors, meta = optimizer_tensors(setup.optimizer)
            save_file(tensors, partial / OPTIMIZER_FILE)
            write_json(partial / OPTIMIZER_META, meta)
        write_state(
            partial,
            {
                "format": "accelerate" if sharded else "safetensors",
                "world_size": acc.num_processes,
                "global_batch": setup.plan.step_size,
                "config": to_dict(cfg),
                "state": state.to_json(),
                "before": before,
            },
        )
        publish(partial, final, state.step)
        rotate(cfg.output_dir, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def load_checkpoint(run, path: Path, saved: dict) -> None:
    """Restore trained weights and optimizer state from a checkpoint (every process)."""
    from safetensors.torch import load_file

    launch, setup, trainable = run.launch, run.setup, run.trainable
    acc = launch.accelerator
    if saved.get("format") == "accelerate":
        acc.load_state(str(path / ACCELERATE_STATE))
        return
    model = acc.unwrap_model(trainable.model)
    if launch.method.adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        weights = {}
        for file in sorted(path.glob("model*.safetensors")):
            weights.update(load_file(file))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if unexpected or [k for k in missing if k not in tied]:
            raise SystemExit(
                f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    if trainable.head is not None:
        trainable.head.load_state_dict(load_file(path / "classifier_head.safetensors"))
    load_optimizer(setup.optimizer, load_file(path / OPTIMIZER_FILE), read_json(path / OPTIMIZER_META))


def save_best(run, metrics: dict, step: int) -> None:
    """Replace best/ with the model as it is now (every process; the swap is atomic on the main one)."""
    from arxiv_ft.rundir import RunDir

    cfg, launch = run.cfg, run.launch
    out = Path(cfg.output_dir)
    partial, best, old = out / "best.partial", out / "best", out / "best.old"
    if launch.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    launch.accelerator.wait_for_everyone()
    save_weights(run, partial)
    if launch.is_main:
        RunDir(partial).write_metrics({"step": step, "eval": metrics})
        fsync_tree(partial)
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(partial, best)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out)
    launch.accelerator.wait_for_everyone()


def ensure_checkpoint(run, state: TrainState, before) -> None:
    """A checkpoint of the step reached, unless the newest one already is."""
    cfg = run.cfg
    done = complete_checkpoints(cfg.output_dir)
    if not (done and _step_of(done[-1]) == state.step):
        save_checkpoint(run, state, before)
