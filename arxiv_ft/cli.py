"""The `arxiv-ft` command: one entry point, one option style, every subcommand.

    arxiv-ft train    [options]   fine-tune and evaluate (= accelerate launch train.py / -m arxiv_ft.train)
    arxiv-ft infer    [options]   classify papers from files, the arXiv API or the metadata dump (= infer.py)
    arxiv-ft baseline [options]   TF-IDF + linear classifier on the same papers
    arxiv-ft report LEDGERS...    task gain vs forgetting vs cost, from run ledgers
    arxiv-ft merge RUN --out DIR  fold an adapter into a standalone model folder
    arxiv-ft sweep SPEC --out DIR learning-rate sweeps per method and seed; again = skip finished points
    arxiv-ft calibrate --model-dir RUN   fit a temperature on validation papers (infer's probabilities, abstention)
    arxiv-ft interpolate RUN      WiSE-FT: score the run at alpha in [0, 1] of the way from its base (one ledger each)
    arxiv-ft push RUN --repo R    upload a finished run folder to the Hub (retry a failed --push-to-hub)
    arxiv-ft fetch --query Q --out FILE   papers from the arXiv API into a JSONL file

`arxiv-ft SUBCOMMAND --help` lists a subcommand's options. Under several processes, launch the module instead:
`accelerate launch -m arxiv_ft.train ...` (or the top-level train.py / infer.py).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("arxiv_ft.train", "fine-tune and evaluate"),
    "infer": ("arxiv_ft.infer", "classify papers (files, arXiv API, metadata dump)"),
    "baseline": ("arxiv_ft.baseline", "TF-IDF + linear classifier baseline"),
    "report": ("arxiv_ft.report", "compare runs: gain vs forgetting vs cost"),
    "merge": ("arxiv_ft.merge", "merge an adapter into a full model folder"),
    "sweep": ("arxiv_ft.sweep", "learning-rate sweeps: one train.py run per (method, rate, seed)"),
    "calibrate": ("arxiv_ft.calibration", "fit a temperature on validation papers (calibrated probabilities)"),
    "interpolate": ("arxiv_ft.interpolate", "WiSE-FT curve of a finished run (alpha from base to run)"),
    "push": ("arxiv_ft.card", "upload a finished run folder to the Hub"),
    "fetch": ("arxiv_ft.arxiv_api", "fetch papers from the arXiv API"),
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a subcommand's own `main` (each imports its heavy libraries only after parsing)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        width = max(map(len, COMMANDS))
        print("\nsubcommands:\n" + "\n".join(f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items()))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\narxiv-ft: unknown subcommand {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0 if argv else 2)
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:], prog=f"arxiv-ft {argv[0]}")


if __name__ == "__main__":
    main()
