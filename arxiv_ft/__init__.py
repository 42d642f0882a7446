"""arxiv-ft: fine-tune causal LLMs to classify arXiv papers by primary category, and measure what each way of
fine-tuning costs and what it makes the model forget.

    from arxiv_ft import Classifier, TrainConfig
    from arxiv_ft.train import train
    metrics = train(TrainConfig(train_per_class=30, output_dir="runs/x"))
    Classifier.from_pretrained("runs/x").predict([{"title": "...", "abstract": "..."}])

Names load on first use, so `import arxiv_ft` (and every command's --help) stays fast.
"""

from __future__ import annotations

_EXPORTS = {
    "Classifier": "arxiv_ft.classifier",
    "TrainConfig": "arxiv_ft.options",
    "InferConfig": "arxiv_ft.options",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'arxiv_ft' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
