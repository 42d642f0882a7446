"""Classify papers with a causal LM: constrained label scoring (default) or free generation (the tutorial's way).

Label scoring: log p(label tokens + end-of-turn | prompt) for every allowed label, argmax, softmax over labels.
Cost per batch: the prompt prefix shared by all papers (system turn with the label list) runs once, each paper's
own tokens run once with that prefix's KV cache, and all labels are scored as one short batched continuation
from each paper's cache, never one full forward pass per label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from arxiv_ft.data import PromptBuilder, left_pad
from arxiv_ft.loss import LabelTree, label_log_likelihoods, last_hidden_state
from arxiv_ft.records import Record


@dataclass
class Prediction:
    """A paper's predicted label and the probability of each allowed label (in label-set order)."""

    id: str
    predicted: str
    probs: list[float]


class LabelScorer:
    """Scores every allowed label for batches of papers with one model; see the module docstring."""

    def __init__(self, model, builder: PromptBuilder, pad_id: int, use_prefix_cache: bool = True):
        self.model = model
        self.builder = builder
        self.pad_id = pad_id
        self.prefix = builder.shared_prefix_ids() if use_prefix_cache else []
        self.tree = LabelTree([builder.label_targets[label] for label in builder.labels])

    @torch.no_grad()
    def score_prompts(self, prompts: list[list[int]]) -> torch.Tensor:
        """Log-likelihood of each label (+ end-of-turn) after each prompt: a [len(prompts), n_labels] tensor."""
        return label_log_likelihoods(self.model, self.tree, *self.batch(prompts)).cpu()

    def batch(self, prompts: list[list[int]]) -> tuple:
        """(input ids, attention mask, position ids, shared prefix ids or None) on the model's device: the prompts
        after the shared prefix, left-padded; the prefix runs once (when every prompt starts with it)."""
        device = self.model.device
        prefix = self.prefix if all(p[: len(self.prefix)] == self.prefix for p in prompts) else []
        input_ids, mask, positions = left_pad([p[len(prefix) :] for p in prompts], self.pad_id)
        shared = torch.tensor([prefix], device=device) if prefix else None
        return input_ids.to(device), mask.to(device), positions.to(device), shared

    def predict(self, records: list[Record], batch_size: int, progress: bool = False) -> list[Prediction | None]:
        """Predictions in input order; None for a record whose prompt cannot fit the token budget."""
        from tqdm.auto import tqdm

        prompts = [self.builder.prompt_ids(r) for r in records]
        order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
        results: list[Prediction | None] = [None] * len(records)
        # Length-sorted batches: papers of similar length pad little.
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            scores = self.score_prompts([prompts[i] for i in idx])
            probs = torch.softmax(scores, dim=-1)
            for row, i in enumerate(idx):
                best = int(scores[row].argmax())
                results[i] = Prediction(records[i].id, self.builder.labels[best], probs[row].tolist())
        return results


class HeadScorer(LabelScorer):
    """Scores labels with a classification head on the last prompt token (the cls-head objective's model)."""

    def __init__(self, model, head, builder: PromptBuilder, pad_id: int, use_prefix_cache: bool = True):
        super().__init__(model, builder, pad_id, use_prefix_cache)
        self.head = head

    @torch.no_grad()
    def score_prompts(self, prompts: list[list[int]]) -> torch.Tensor:
        """Head logits (log-probabilities up to a constant per row): a [len(prompts), n_labels] tensor."""
        hidden = last_hidden_state(self.model, *self.batch(prompts))
        return torch.log_softmax(self.head(hidden), dim=-1).cpu()


def trie_nodes(builder: PromptBuilder) -> int:
    """The label trie's size (its distinct label-token prefixes) without building the trie's node x node mask."""
    targets = [builder.label_targets[label] for label in builder.labels]
    return len({tuple(t[:j]) for t in targets for j in range(1, len(t))})


def trie_memory_bytes(builder: PromptBuilder, model_config, batch: int) -> int:
    """An upper estimate of what one label-scoring forward allocates beyond the weights, in bytes (fp32 activations):
    the trie's logits over the vocabulary, its attention scores and mask over prompt + trie, the shared prefix's
    attention. It grows with the number of trie nodes times the vocabulary: 21 labels ~0.2 GB at batch 16, 10,000
    labels hundreds of GB."""
    nodes = trie_nodes(builder)
    prefix = len(builder.shared_prefix_ids())
    context = prefix + builder.max_prompt_tokens + nodes
    heads = getattr(model_config, "num_attention_heads", 1)
    logits = batch * nodes * model_config.vocab_size * 4 * 2  # the logits and their float32 log-sum-exp pass
    attention = batch * heads * nodes * context * 4 + batch * nodes * context
    return logits + attention + heads * prefix * prefix * 4


def memory_available(device) -> int:
    """Bytes of the device's memory (a GPU's total, or the machine's physical memory for the CPU)."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_scoring_memory(
    builder: PromptBuilder, model_config, batch: int, device, option: str, factor: int = 1
) -> None:
    """Refuse, before the model is loaded, a label set whose scoring forward cannot fit in half the device's memory
    (10,000 labels tried to allocate 26 GB after 7 minutes of training, then died), naming the estimate and the batch
    size that would fit. `factor`: 3 where a backward pass keeps the activations (the label-softmax objective)."""

    def need_at(b: int) -> int:
        return factor * trie_memory_bytes(builder, model_config, b)

    need, have = need_at(batch), memory_available(device) // 2
    if need <= have:
        return
    fits = max((b for b in range(batch - 1, 0, -1) if need_at(b) <= have), default=0)
    hint = f"pass {option} {fits}" if fits else "use fewer labels (no batch size fits: one paper alone needs "
    hint += "" if fits else f"{need_at(1) / 2**30:.1f} GiB)"
    raise SystemExit(
        f"scoring {len(builder.labels):,} labels at {option} {batch} needs ~{need / 2**30:.1f} GiB for the label trie "
        f"({trie_nodes(builder):,} nodes x a vocabulary of "
        f"{model_config.vocab_size:,}), more than half of this {torch.device(device).type}'s "
        f"{2 * have / 2**30:.0f} GiB: {hint}"
    )


def parse_generated(text: str, labels: list[str]) -> str | None:
    """The label a free-form answer names: the first whole label in it, case-insensitive, else None.

    Whole means not inside a longer word: `cs.LGX` names no label (a substring match read it as cs.LG), `CS.lg`
    names cs.LG, and a label may end a sentence ("... is cs.CV.").
    """
    by_lower = {label.lower(): label for label in labels}
    choices = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    found = re.search(rf"(?<![\w.])({choices})(?!\w)", text, flags=re.IGNORECASE)
    return by_lower[found.group(1).lower()] if found else None


@torch.no_grad()
def generate_labels(
    model, tokenizer, builder: PromptBuilder, records: list[Record], batch_size: int, max_new_tokens: int = 8
):
    """Greedy generation and parsing, batched with left padding; returns (raw text, parsed label or None) per record."""
    results: list[tuple[str, str | None] | None] = [None] * len(records)
    prompts = [builder.prompt_ids(r) for r in records]
    order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            results[i] = (text, parse_generated(text, builder.labels))
    return results
