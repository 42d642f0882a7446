"""Where training and evaluation papers come from: files, `datasets` folders and Hub datasets, mapped to records."""

from __future__ import annotations

from arxiv_ft import records as rec


def load_task(cfg) -> tuple[list[str], list[rec.Record], list[rec.Record]]:
    """The label set, training and evaluation records of a train/baseline config (labels checked, sampled per class)."""
    return rec.load_task(cfg.labels, cfg.train_file, cfg.eval_file, cfg.train_per_class, cfg.eval_per_class, cfg.seed)
