"""The loss: only target positions, the gathered head equals the full head, packed equals padded, accumulation
equals a large batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arxiv_ft.data import (
    IGNORE_INDEX,
    PromptBuilder,
    collate_left_padded,
    collate_packed,
    collate_prompts,
    tokenize_records,
)
from arxiv_ft.loss import (
    AnswerLoss,
    ClassificationHead,
    HeadLoss,
    LabelSoftmaxLoss,
    LabelTree,
    loss_scale,
    predicting_positions,
    summed_loss,
    target_token_count,
)
from arxiv_ft.options import LLAMA_LINEAR_MODULES
from arxiv_ft.prompts import get_template
from tests.conftest import apply_lora, make_tiny_llama


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


def test_gathered_head_loss_equals_full_vocabulary_reference(tokenizer, examples):
    exs, _ = examples
    model = make_tiny_llama(tokenizer)
    batch = collate_left_padded(exs, tokenizer.pad_token_id)
    fast = AnswerLoss(model)(**batch)
    assert int(predicting_positions(batch["labels"]).sum()) == sum(len(e.target_ids) for e in exs)
    torch.testing.assert_close(fast, reference_loss(model, batch), rtol=1e-5, atol=1e-5)


def lora_model(tokenizer):
    model = apply_lora(make_tiny_llama(tokenizer), 4, 8, 0.0, LLAMA_LINEAR_MODULES)
    for p in model.parameters():  # make LoRA B non-zero so every adapter weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(**batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_shared_prefix_gives_the_same_loss_and_gradients(tokenizer, examples):
    exs, builder = examples
    model = lora_model(tokenizer)
    prefix = builder.shared_prefix_ids()
    shared = loss_and_grads(
        model, AnswerLoss(model, prefix), collate_left_padded(exs, tokenizer.pad_token_id, len(prefix))
    )
    plain = loss_and_grads(model, AnswerLoss(model), collate_left_padded(exs, tokenizer.pad_token_id))
    assert_same(shared, plain)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_batch_gives_the_padded_loss_and_gradients(tokenizer, examples, share_prefix):
    """No padding, position ids restarting per example, block-diagonal attention: the same numbers as padding."""
    exs, builder = examples
    model = lora_model(tokenizer)
    prefix = builder.shared_prefix_ids() if share_prefix else []
    loss_fn = AnswerLoss(model, prefix)
    packed_batch = collate_packed(exs, len(prefix))
    assert packed_batch["input_ids"].shape == (1, sum(len(e.input_ids) - len(prefix) for e in exs))
    packed = loss_and_grads(model, loss_fn, packed_batch)
    padded = loss_and_grads(model, loss_fn, collate_left_padded(exs, tokenizer.pad_token_id, len(prefix)))
    assert_same(packed, padded)


def test_packed_examples_cannot_see_each_other(tokenizer, examples):
    """Changing the first example's tokens leaves the second example's loss unchanged, in either order."""
    exs, _ = examples
    model = make_tiny_llama(tokenizer)
    a, b = exs[0], exs[1]
    changed = type(a)(a.id, a.label, [a.prompt_ids[0]] + [7] * (len(a.prompt_ids) - 1), a.target_ids)
    alone_b = AnswerLoss(model)(**collate_packed([b]))
    for first in (a, changed):
        both = AnswerLoss(model)(**collate_packed([first, b]))
        torch.testing.assert_close(both - AnswerLoss(model)(**collate_packed([first])), alone_b, rtol=1e-5, atol=1e-5)


def test_targets_must_be_predicted_and_gathered():
    with pytest.raises(ValueError, match="starts with a target"):
        predicting_positions(torch.tensor([[5, IGNORE_INDEX]]))
    with pytest.raises(ValueError, match="no target"):
        predicting_positions(torch.full((2, 3), IGNORE_INDEX))
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 7]])
    with pytest.raises(ValueError, match="2 targets"):
        summed_loss(torch.zeros(3, 10), labels)


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


def test_decision_positions_are_where_labels_part(examples):
    _, builder = examples
    # `cs . XX <eot>`: only the category piece decides; `cs`, `.` and the end-of-turn follow from what precedes them.
    for label in builder.labels:
        target, decisions = builder.label_targets[label], builder.label_decisions[builder.labels.index(label)]
        assert len(decisions) == len(target) and sum(decisions) >= 1
        assert not decisions[0] and not decisions[-1]


def test_weighted_loss_with_unit_weights_is_the_plain_loss_and_weights_scale_decisions(tokenizer, examples):
    exs, builder = examples
    model = make_tiny_llama(tokenizer)
    plain = AnswerLoss(model)(**collate_left_padded(exs, tokenizer.pad_token_id))
    ones = collate_left_padded(exs, tokenizer.pad_token_id, 0, 1.0, builder.label_decisions)
    torch.testing.assert_close(AnswerLoss(model)(**ones), plain, rtol=1e-6, atol=1e-6)
    heavy = collate_left_padded(exs, tokenizer.pad_token_id, 0, 3.0, builder.label_decisions)
    only = collate_left_padded(exs, tokenizer.pad_token_id, 0, 1.0, builder.label_decisions)
    only["weights"] = heavy["weights"] - only["weights"]  # 2 on decision tokens, 0 elsewhere
    torch.testing.assert_close(AnswerLoss(model)(**heavy), plain + AnswerLoss(model)(**only), rtol=1e-5, atol=1e-5)


def test_label_softmax_loss_is_cross_entropy_over_naive_label_likelihoods(tokenizer, examples):
    """The objective equals -log softmax over labels of sum log p(label + eot | prompt), computed the slow way with
    one full forward per label; with the shared prefix the loss and gradients are the same."""
    exs, builder = examples
    model = lora_model(tokenizer)
    tree = LabelTree([builder.label_targets[label] for label in builder.labels])
    want = 0.0
    with torch.no_grad():
        for ex in exs[:3]:
            naive = []
            for label in builder.labels:
                target = builder.label_targets[label]
                logp = torch.log_softmax(model(torch.tensor([ex.prompt_ids + target])).logits[0].float(), -1)
                n = len(ex.prompt_ids)
                naive.append(sum(logp[n - 1 + j, t] for j, t in enumerate(target)))
            want += float(-torch.log_softmax(torch.stack(naive), 0)[ex.label_index])
    got = LabelSoftmaxLoss(model, tree)(**collate_prompts(exs[:3], tokenizer.pad_token_id))
    assert abs(float(got.detach()) - want) < 1e-3
    prefix = builder.shared_prefix_ids()
    shared = loss_and_grads(
        model, LabelSoftmaxLoss(model, tree, prefix), collate_prompts(exs, tokenizer.pad_token_id, len(prefix))
    )
    plain = loss_and_grads(model, LabelSoftmaxLoss(model, tree), collate_prompts(exs, tokenizer.pad_token_id))
    assert_same(shared, plain)


def test_head_loss_reads_the_last_prompt_token_with_or_without_the_shared_prefix(tokenizer, examples):
    exs, builder = examples
    model = lora_model(tokenizer)
    head = ClassificationHead(model.config.hidden_size, len(builder.labels))
    prefix = builder.shared_prefix_ids()
    shared = loss_and_grads(
        model, HeadLoss(model, head, prefix), collate_prompts(exs, tokenizer.pad_token_id, len(prefix))
    )
    plain = loss_and_grads(model, HeadLoss(model, head), collate_prompts(exs, tokenizer.pad_token_id))
    assert_same(shared, plain)
    with torch.no_grad():  # the textbook way: one unpadded forward per paper, its last position's final hidden state
        body = model.get_base_model().model
        want = sum(
            float(
                F.cross_entropy(
                    head(body(torch.tensor([ex.prompt_ids])).last_hidden_state[:, -1]),
                    torch.tensor([ex.label_index]),
                    reduction="sum",
                )
            )
            for ex in exs
        )
    assert abs(float(shared[0]) - want) < 1e-3
