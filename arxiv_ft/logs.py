"""What the commands print: `logging` with levels, one line per event, and no library noise that is not the user's.

`setup_logging` is for the command line only; a Python caller keeps its own logging configuration.
"""

from __future__ import annotations

import logging
import os
import warnings


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm, so a log line never lands in the middle of a progress bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never take the run down
            self.handleError(record)


class _Format(logging.Formatter):
    """INFO as the bare message (the progress of a run); other levels prefixed with the level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def setup_logging(level: str | None = None) -> None:
    """Log arxiv_ft at INFO (ARXIV_FT_LOG_LEVEL overrides) to stderr; quiet the libraries' own warnings."""
    handler = _TqdmHandler()
    handler.setFormatter(_Format("%(message)s"))
    root = logging.getLogger("arxiv_ft")
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("ARXIV_FT_LOG_LEVEL", "INFO"))
    root.propagate = False
    # Deprecation notices about the libraries' own internals (`is_gradient_checkpointing`, `past_key_values`):
    # nothing the user can act on. Real errors still raise.
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings(
            "ignore", category=category, module=r"(transformers|peft|accelerate|torch|bitsandbytes)"
        )
    warnings.filterwarnings("ignore", message=r".*(past_key_values|is_gradient_checkpointing|use_cache=True).*")
    # bitsandbytes announces on import that an optional CPU kernel package is missing: advice for its developers.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
