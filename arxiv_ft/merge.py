"""Merge a LoRA/QLoRA/DoRA run into a standalone full-precision model folder, for plain transformers or vLLM.

    arxiv-ft merge runs/default --out runs/default-merged
    python -m arxiv_ft.merge runs/default --out runs/default-merged

The merged folder is a run folder of its own (method `full`): `infer.py --model-dir` and `Classifier.from_pretrained`
load it; so does `AutoModelForCausalLM.from_pretrained`. QLoRA adapters merge onto the de-quantised nf4 base they were
trained against, so the merged model predicts like base + adapter did.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from arxiv_ft.options import MergeConfig

MERGED, PARTIAL_MARK = "merged.json", ".merge-partial"


def check_merge_output(run, out: Path, tmp: Path) -> None:
    """Refuse an output the merge would destroy something in: only an earlier merge of the same run (or the
    leftover of an interrupted one) is replaced; the run itself, a folder holding it and its base are never touched."""
    from arxiv_ft.fileio import read_json
    from arxiv_ft.rundir import overlaps

    base = run.base_record().get("path")
    if out.resolve() == run.path.resolve() or run.path.resolve().is_relative_to(out.resolve()):
        raise SystemExit(f"--out {out} is or holds the run {run.path}: the merge replaces --out; choose a new folder")
    if base and overlaps(out, Path(base)):
        raise SystemExit(f"--out {out} overlaps the run's base model {base}; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        earlier = read_json(out / MERGED).get("from") if (out / MERGED).is_file() else None
        if earlier != str(run.path.resolve()):
            raise SystemExit(
                f"--out {out} exists and is not an earlier merge of {run.path}: the merge would delete what it holds; "
                "choose a new folder (or remove it yourself)"
            )
    if tmp.exists() and any(tmp.iterdir()) and not (tmp / PARTIAL_MARK).is_file():
        raise SystemExit(f"{tmp} exists and was not left by an interrupted merge; move it away first")


def merge_run(run_dir: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Fold the adapter of `run_dir` into its base and write a loadable full-model run folder at `out`."""
    from tqdm.auto import tqdm

    from arxiv_ft.card import merged_card
    from arxiv_ft.fileio import write_json
    from arxiv_ft.modeling import torch_dtype
    from arxiv_ft.rundir import RunDir

    run, out = RunDir(run_dir).check(), Path(out)
    method = run.method()
    if not method.adapter:
        raise SystemExit(f"{run_dir}: a {method.name} run is already a whole model; there is no adapter to merge")
    tmp = out.with_name(out.name + ".partial")
    check_merge_output(run, out, tmp)
    with tqdm(total=3, desc="merge", unit="step") as bar:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARK).touch()
        method.merge(run.path, run.base_source(), tmp, torch_dtype(dtype))
        bar.update()
        run.load_tokenizer().save_pretrained(tmp)
        merged = RunDir(tmp)
        config = {
            **run.config(),
            "method": "full",
            "merged_from": str(run.path.resolve()),
            "merged_method": method.name,
        }
        merged.write_task(config, run.labels(), run.prompt(), run.base_record())
        if run.has_head():
            shutil.copy(run.path / "classifier_head.safetensors", tmp / "classifier_head.safetensors")
        write_json(tmp / MERGED, {"from": str(run.path.resolve()), "method": method.name, "dtype": dtype})
        card = merged_card(run.path, dtype)
        if card:
            merged.write_card(card)
        bar.update()
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        (out / PARTIAL_MARK).unlink()
        bar.update()
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.logs import setup_logging

    cfg = parse_config(MergeConfig, argv, __doc__, prog)
    setup_logging()
    out = merge_run(cfg.run_dir, cfg.out or Path(cfg.run_dir) / "merged", cfg.dtype)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
