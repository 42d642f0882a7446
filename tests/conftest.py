"""Shared fixtures: the real SmolLM2 tokenizer (converted once per cache) and tiny random LLaMA models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "arxiv_ft" / "assets"


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
