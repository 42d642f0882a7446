"""Classify papers with a causal LM: constrained label scoring (default) or free generation (the tutorial's way).

Label scoring: log p(label tokens + end-of-turn | prompt) for every allowed label, argmax, softmax over labels.
Cost per batch: the prompt prefix shared by all papers (system turn with the label list) runs once, each paper's
own tokens run once with that prefix's KV cache, and all labels are scored as one short batched continuation
from each paper's cache, never one full forward pass per label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from arxiv_ft.data import PromptBuilder
from arxiv_ft.records import Record


@dataclass
class Prediction:
    """A paper's predicted label and the probability of each allowed label (in label-set order)."""

    id: str
    predicted: str
    probs: list[float]

    def top_k(self, labels: list[str], k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(labels)), key=lambda i: -self.probs[i])[:k]
        return [(labels[i], self.probs[i]) for i in order]


class LabelTree:
    """The labels' token sequences as a trie, fed as one row of tokens in which each token sees only its ancestors.

    Scoring every label then costs one extra forward of (number of distinct label prefixes) tokens per paper
    with no copy of the prompt's KV cache: 21 arXiv labels `cs . XX <eot>` need 23 tokens, not 21 x 3.
    """

    def __init__(self, targets: list[list[int]]):
        index: dict[tuple[int, ...], int] = {}
        tokens, depths, parents = [], [], []
        for t in targets:
            for j in range(1, len(t)):
                prefix = tuple(t[:j])
                if prefix not in index:
                    index[prefix] = len(tokens)
                    tokens.append(t[j - 1])
                    depths.append(j - 1)
                    parents.append(index.get(prefix[:-1], -1))
        n = len(tokens)
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.depths = torch.tensor(depths, dtype=torch.long)
        self.sees = torch.zeros((n, n), dtype=torch.bool)  # sees[i, k]: node k is node i or an ancestor of it
        for i in range(n):
            k = i
            while k >= 0:
                self.sees[i, k] = True
                k = parents[k]
        width = max(len(t) for t in targets)
        # For label l and step j >= 1: the node whose output predicts token j, and that token.
        self.step_nodes = torch.zeros((len(targets), width - 1), dtype=torch.long)
        self.step_tokens = torch.zeros((len(targets), width - 1), dtype=torch.long)
        self.step_valid = torch.zeros((len(targets), width - 1), dtype=torch.bool)
        for l_idx, t in enumerate(targets):
            for j in range(1, len(t)):
                self.step_nodes[l_idx, j - 1] = index[tuple(t[:j])]
                self.step_tokens[l_idx, j - 1] = t[j]
                self.step_valid[l_idx, j - 1] = True
        self.first_tokens = torch.tensor([t[0] for t in targets], dtype=torch.long)


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
        device = self.model.device
        prefix = self.prefix if all(p[: len(self.prefix)] == self.prefix for p in prompts) else []
        suffixes = [p[len(prefix) :] for p in prompts]
        batch, n_prefix = len(prompts), len(prefix)
        width = max(len(s) for s in suffixes)
        # Left-pad the paper's own tokens: each row's last prompt token is then in the last column.
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, n_prefix + width), dtype=torch.bool)
        mask[:, :n_prefix] = True
        for row, s in enumerate(suffixes):
            input_ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, n_prefix + width - len(s) :] = True
        positions = mask.long().cumsum(-1) - 1
        cache = None
        if n_prefix:
            out = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
            )
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=mask.long().to(device),
            position_ids=positions[:, n_prefix:].clamp(min=0).to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        tree = self.tree
        scores = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, tree.first_tokens.to(device)]
        if len(tree.tokens):
            n_nodes = len(tree.tokens)
            # 4D boolean mask (True = attend): every node sees the paper's prompt and its own ancestors.
            node_mask = torch.cat(
                [mask[:, None, None, :].expand(batch, 1, n_nodes, -1), tree.sees[None, None].expand(batch, 1, -1, -1)],
                dim=-1,
            )
            out = self.model(
                input_ids=tree.tokens[None].expand(batch, -1).to(device),
                attention_mask=node_mask.to(device),
                position_ids=(positions[:, -1:] + 1 + tree.depths[None]).to(device),
                cache=out.past_key_values,
                use_cache=True,
            )
            logits = out.logits.float()  # [batch, nodes, vocab]
            # log p = logit - logsumexp: gather the few needed logits instead of a full log-softmax copy.
            nodes, tokens = tree.step_nodes.to(device), tree.step_tokens.to(device)
            step = logits[:, nodes, tokens] - torch.logsumexp(logits, dim=-1)[:, nodes]  # [batch, labels, steps]
            scores = scores + (step * tree.step_valid.to(device)).sum(-1)
        return scores.cpu()

    def predict(self, records: list[Record], batch_size: int) -> list[Prediction | None]:
        """Predictions in input order; None for a record whose prompt cannot fit the token budget."""
        prompts = [self.builder.prompt_ids(r) for r in records]
        order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
        results: list[Prediction | None] = [None] * len(records)
        # Length-sorted batches: papers of similar length pad little.
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores = self.score_prompts([prompts[i] for i in idx])
            probs = torch.softmax(scores, dim=-1)
            for row, i in enumerate(idx):
                best = int(scores[row].argmax())
                results[i] = Prediction(records[i].id, self.builder.labels[best], probs[row].tolist())
        return results


def parse_generated(text: str, labels: list[str]) -> str | None:
    """The label a free-form answer names: an exact match, else the first label mentioned, else None."""
    answer = text.strip()
    if answer in labels:
        return answer
    hits = [(answer.find(label), -len(label), label) for label in labels if label in answer]
    return min(hits)[2] if hits else None


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
