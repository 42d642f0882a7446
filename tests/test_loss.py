"""The loss: only target positions, the windowed head equals the full head, accumulation equals a large batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arxiv_ft.data import IGNORE_INDEX, PromptBuilder, collate_left_padded, tokenize_records
from arxiv_ft.loss import AnswerLoss, logits_window, loss_scale, summed_loss, target_token_count
from arxiv_ft.modeling import LLAMA_LINEAR_MODULES, apply_lora
from arxiv_ft.prompts import get_template
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def examples(tokenizer, labels, train_records):
    b = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, max_seq_tokens=160)
    return tokenize_records(b, train_records[:8])[0], b


def reference_loss(model, batch):
    """The textbook computation: full logits, shift, mean over positions whose label is not -100."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def test_windowed_loss_equals_full_vocabulary_reference(tokenizer, examples):
    exs, _ = examples
    model = make_tiny_llama(tokenizer)
    batch = collate_left_padded(exs, tokenizer.pad_token_id)
    fast = AnswerLoss(model)(**batch)
    assert logits_window(batch["labels"]) == max(len(e.target_ids) for e in exs) + 1
    torch.testing.assert_close(fast, reference_loss(model, batch), rtol=1e-5, atol=1e-5)


def test_shared_prefix_gives_the_same_loss_and_gradients(tokenizer, examples):
    exs, builder = examples
    model = apply_lora(make_tiny_llama(tokenizer), 4, 8, 0.0, LLAMA_LINEAR_MODULES)
    for p in model.parameters():  # make LoRA B non-zero so every adapter weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    results = []
    prefix = builder.shared_prefix_ids()
    for pre in (prefix, []):
        model.zero_grad()
        loss = AnswerLoss(model, pre)(**collate_left_padded(exs, tokenizer.pad_token_id, len(pre)))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_targets_outside_the_window_are_refused():
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 7]])
    with pytest.raises(ValueError, match="outside the last"):
        summed_loss(torch.zeros(1, 2, 10), labels)


def test_accumulation_gives_the_large_batch_gradient(tokenizer, examples):
    """Batch 8 vs 4 x 2 accumulation (micro-batches with different target counts) vs 2 x 4."""
    exs, _ = examples
    model = make_tiny_llama(tokenizer)
    loss_fn = AnswerLoss(model)
    # Unequal target counts per micro-batch: drop the answer of some examples' first token.
    exs = [e for e in exs]
    exs[0].target_ids = exs[0].target_ids[:2]

    def grads(micro_batches: int):
        model.zero_grad()
        chunks = [exs[i::micro_batches] for i in range(micro_batches)]
        total = sum(target_token_count(collate_left_padded(c, 0)["labels"]) for c in chunks)
        for chunk in chunks:
            loss = loss_fn(**collate_left_padded(chunk, tokenizer.pad_token_id))
            # accelerate divides every micro-batch loss by grad_accum_steps; mimic it
            (loss * loss_scale(total, world_size=1, grad_accum_steps=micro_batches) / micro_batches).backward()
        return [p.grad.clone() for p in model.parameters()]

    big, two, four = grads(1), grads(2), grads(4)
    for a, b, c in zip(big, two, four):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-7)
    # And it is the per-token mean: the large-batch gradient of the mean loss.
    model.zero_grad()
    batch = collate_left_padded(exs, tokenizer.pad_token_id)
    (reference_loss(model, batch) / target_token_count(batch["labels"])).backward()
    for a, p in zip(big, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
