"""WiSE-FT interpolation: one finished run gives a curve of accuracy against forgetting, without retraining.

    arxiv-ft interpolate runs/lora-s10 --alphas 0,0.25,0.5,0.75,1
    arxiv-ft interpolate runs/full-s10 --alphas 0,0.5,1 --probe-windows 64 --probe-mc-items 800

For each α the model is the base moved by α of the way to the run (Wortsman et al. 2022):
- full fine-tuning: θ = θ_base + α (θ_tuned − θ_base), every weight;
- LoRA / QLoRA: the learned update scaled by α, W + α·s·BA (the adapter's scaling multiplied by α; QLoRA keeps its
  nf4 base);
- DoRA: the same scaling of BA, and the magnitude moved from its starting value ‖W‖ by α, m₀ + α (m − m₀), so that
  α = 0 is the base exactly.
Each α is scored on the run's own validation and test papers and probed for forgetting (against the same base,
cached), and written as its own ledger, `RUN/interpolation/alpha-0.50/ledger.json`: the run's config with
`wise_alpha`, its TF-IDF rows (same papers), its cost plus the scoring's seconds. `arxiv-ft report` reads them like any
run (groups are named `wise_alpha=0.5`). A finished α is skipped when the command runs again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from arxiv_ft.options import parse_alphas

logger = logging.getLogger("arxiv_ft.interpolate")  # not __name__: run as -m, that is __main__


@torch.no_grad()
def scale_adapter(model, alpha: float) -> int:
    """Scale every LoRA/DoRA layer's learned update by `alpha`, in place (see the module docstring); returns the number
    of layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.scaling:
                continue
            magnitude = getattr(module, "lora_magnitude_vector", {})
            if name in magnitude:  # DoRA: m0 = the base weight's row norms, where its training started
                dora = magnitude[name]
                base = dequantized_weight(module.get_base_layer())
                start = dora.get_weight_norm(base, torch.zeros_like(base), 0.0).to(dora.weight.dtype)
                dora.weight.copy_(start + alpha * (dora.weight - start))
            module.scaling[name] *= alpha
            changed += 1
    return changed


def dequantized_weight(layer) -> torch.Tensor:
    """A linear layer's weight in float32; a 4-bit layer's read through its own kernel (x = I gives Wᵀ; its packed
    bytes are repacked for the CPU kernel after the first forward, so they are not read directly)."""
    if layer.weight.__class__.__name__ != "Params4bit":
        return layer.weight.float()
    eye = torch.eye(layer.in_features, device=layer.weight.device)
    out = layer(eye).float()
    return (out - layer.bias.float() if layer.bias is not None else out).T.contiguous()


@torch.no_grad()
def interpolate_weights(tuned, base, alpha: float) -> None:
    """θ_tuned ← θ_base + α (θ_tuned − θ_base) for every parameter and buffer of two models of one architecture."""
    base_state = base.state_dict()
    for name, tensor in tuned.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(base_state[name] + alpha * (tensor - base_state[name]))


def interpolated_model(run, alpha: float, dtype=torch.float32):
    """The run's model moved α of the way from its base (a fresh copy), and the base model for full fine-tuning (the
    KL reference; None for adapters, whose base is the model with the adapter switched off)."""
    from arxiv_ft.modeling import load_model

    model = run.load_model(dtype)
    if run.method().adapter:
        if scale_adapter(model, alpha) == 0:
            raise SystemExit(f"{run.path}: no LoRA layers found in the adapter")
        return model.eval(), None
    base = load_model(run.base_source(), dtype).eval()
    interpolate_weights(model, base, alpha)
    return model.eval(), base


def interpolate_run(cfg) -> list[Path]:
    """Score and probe the run at every α of `cfg.alphas`; one ledger each. Returns the ledger paths."""
    from arxiv_ft.rundir import RunDir

    run = RunDir(cfg.run_dir).check()
    if not run.is_finished():
        raise SystemExit(f"{cfg.run_dir}: not a finished run (no ledger.json): interpolation starts from one")
    out = Path(cfg.out) if cfg.out else run.path / "interpolation"
    written = []
    for alpha in parse_alphas(cfg.alphas):
        path = out / f"alpha-{alpha:.2f}" / "ledger.json"
        if path.is_file():
            logger.info("alpha %.2f: %s exists, skipped", alpha, path)
        else:
            score_alpha(cfg, run, alpha, path)
        written.append(path)
    return written


def score_alpha(cfg, run, alpha: float, path: Path) -> None:
    """One α: build the model, score validation and test papers, probe, write its ledger."""
    from arxiv_ft.classifier import Classifier, evaluate
    from arxiv_ft.config import config_from_dict
    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.forgetting import (
        ProbeConfig,
        base_probe_key,
        base_probes_cached,
        describe_forgetting,
        forgetting_delta,
        run_probes,
    )
    from arxiv_ft.ledger import Ledger, now, scores
    from arxiv_ft.modeling import cache_dir
    from arxiv_ft.options import TrainConfig
    from arxiv_ft.sources import load_papers, load_test

    started = time.perf_counter()
    trained = config_from_dict(TrainConfig, run.config())
    ledger = json.loads((run.path / "ledger.json").read_text())
    _, _, evals = load_papers(trained)
    # The test file the run itself scored (its ledger names it resolved): `--test-file auto` resolves by the shipped
    # sample's path, which a run scored from another checkout or a moved folder would no longer match.
    test_file = (ledger.get("data") or {}).get("test_file") or trained.test_path
    test = load_test(dataclasses.replace(trained, test_file=test_file), run.labels()) if test_file else []
    model, reference = interpolated_model(run, alpha)
    tokenizer = run.load_tokenizer()
    classifier = Classifier(model, tokenizer, PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels()))
    accelerator = _single_process()
    scored = {}
    for split, records in (("validation", evals), ("test", test)):
        if records:
            result = evaluate(classifier, records, accelerator, "score", cfg.eval_batch_size)
            scored[split] = scores(result["score"])
            logger.info("alpha %.2f %s: accuracy %.4f", alpha, split, scored[split]["accuracy"])
    forgetting = None
    if cfg.probes:
        windows, items = cfg.probe_windows or trained.probe_windows, cfg.probe_mc_items or trained.probe_mc_items
        probes = ProbeConfig(n_windows=windows, mc_items=items, kl=cfg.probe_kl)
        base = base_probes_cached(  # the base as the run measured it (cached), else the model at alpha 0
            run.base_source(),
            tokenizer,
            lambda: interpolated_model(run, 0.0)[0],
            probes,
            cache_dir() / "probes",
            base_probe_key(torch.float32, torch.device("cpu"), run.method()),
        )
        tuned = run_probes(model, tokenizer, probes, base_model=reference)
        delta = forgetting_delta(base, tuned)
        logger.info("alpha %.2f forgetting: %s", alpha, describe_forgetting(delta))
        forgetting = {"base": base, "tuned": tuned, "delta": delta}
    ledger["run_id"] = f"{ledger['run_id']}@alpha{alpha:.2f}"
    ledger["config"] = {**ledger["config"], "wise_alpha": alpha}
    ledger["task"] = {**ledger["task"], "after": scored.get("validation")}
    if ledger.get("test") is not None:  # never the run's own test score under an alpha's name
        if "test" not in scored:
            raise SystemExit(f"{run.path}: the run was scored on test papers ({test_file!r}) that alpha could not read")
        ledger["test"] = {**ledger["test"], "after": scored["test"]}
    ledger["forgetting"] = forgetting
    ledger["created"] = now()
    ledger["cost"] = {**(ledger.get("cost") or {}), "interpolation_seconds": time.perf_counter() - started}
    Ledger.from_json(ledger, str(path)).write(path)


def _single_process():
    from accelerate import PartialState

    return PartialState()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from arxiv_ft.config import parse_config
    from arxiv_ft.logs import setup_logging
    from arxiv_ft.modeling import set_cpu_threads
    from arxiv_ft.options import InterpolateConfig

    cfg = parse_config(InterpolateConfig, argv, __doc__, prog)
    setup_logging()
    set_cpu_threads(cfg.cpu_threads)
    for path in interpolate_run(cfg):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
