"""The package's Hugging Face `evaluate` metric scripts, loaded by path (see `arxiv_ft.metrics.load_metric`)."""
