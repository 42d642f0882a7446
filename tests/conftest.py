"""Shared fixtures: the real SmolLM2 tokenizer (converted once per cache) and tiny random LLaMA models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Hugging Face cache of the test session's own: runs register their base there under its Hub id (for plain peft).
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="arxiv-ft-test-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], True)

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "arxiv_ft" / "assets"
# A short train.py run on the tiny model: 2 papers a class, one epoch (the default is 2) of batches of 6, so tests
# can count its steps; one validation and one test paper a class, each in one batch.
FAST_TRAIN = [
    "--epochs",
    "1",
    "--train-per-class",
    "2",
    "--eval-per-class",
    "1",
    "--test-per-class",
    "1",
    "--batch-size",
    "6",
]
FAST_TRAIN += ["--max-seq-tokens", "160", "--log-every-steps", "100", "--eval-batch-size", "21"]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the real SmolLM2-135M-Instruct (converted from the packaged GGUF on first use, then cached)."""
    from arxiv_ft.modeling import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from arxiv_ft.modeling import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def labels() -> list[str]:
    from arxiv_ft.records import read_labels

    return read_labels(ASSETS / "cs-labels.txt")


@pytest.fixture(scope="session")
def train_records(labels):
    from arxiv_ft.records import read_records

    return list(read_records(ASSETS / "cs-train-sample.jsonl"))


def make_tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer random LLaMA with SmolLM2's vocabulary (3.3M parameters): real shapes, fast on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny random LLaMA with the real tokenizer: a `--model` for end-to-end tests of the scripts."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def apply_lora(model, rank: int, alpha: float, dropout: float, targets, rslora: bool = False, dora: bool = False):
    """The LoRA (or DoRA) method's wrapping of `model`, with these settings (what train builds from its config)."""
    from types import SimpleNamespace

    from arxiv_ft.methods import get_method

    cfg = SimpleNamespace(
        lora_rank=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        lora_targets=",".join(targets),
        lora_rslora=rslora,
        lora_layers=0,
    )
    return get_method("dora" if dora else "lora").wrap(model, cfg)


def run_train(argv: list[str]) -> dict:
    """train() on a parsed command line, in this process (no signal handlers)."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.train import TrainConfig, train

    return train(parse_config(TrainConfig, argv, ""))


def capture_trained_model(monkeypatch) -> dict:
    """Make train hand over its in-memory model (as it is just before saving) in the returned dict."""
    from arxiv_ft import phases

    captured = {}
    original = phases.save_run

    def capture(run, metrics):
        captured["model"] = run.launch.accelerator.unwrap_model(run.trainable.model)
        return original(run, metrics)

    monkeypatch.setattr(phases, "save_run", capture)
    return captured


def load_trained(folder):
    """The model a run folder (or checkpoint, or best/) holds, loaded the way its method saved it, on the CPU."""
    from arxiv_ft.rundir import RunDir

    return RunDir(folder).check().load_model(torch.float32)


def run_predictions(model, tokenizer, out_dir, n: int = 21):
    """Label log-likelihoods of the first `n` validation papers, built from the run folder's labels and prompt."""
    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.records import read_records
    from arxiv_ft.rundir import RunDir
    from arxiv_ft.scoring import LabelScorer

    run = RunDir(out_dir)
    builder = PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels())
    records = list(read_records(ASSETS / "cs-validation-sample.jsonl"))[:n]
    prompts = [p for p in (builder.prompt_ids(r) for r in records) if p is not None]
    return LabelScorer(model, builder, tokenizer.pad_token_id).score_prompts(prompts)
