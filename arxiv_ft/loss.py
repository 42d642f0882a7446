"""The one place where logits and labels meet: the shift, the mask, and the normalisation.

The output head runs only on the positions that predict a target (`logits_to_keep` as a boolean mask): the
full-vocabulary head never runs on prompt positions. Two batch layouts share this: left-padded rows
(`data.collate_left_padded`) and one packed row without padding (`data.collate_packed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from arxiv_ft.data import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: True where the next token is a target (position j predicts label j + 1)."""
    if (labels[:, 0] != IGNORE_INDEX).any():
        raise ValueError("a row starts with a target token: no position predicts it")
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        raise ValueError("batch has no target tokens")
    return keep


def target_token_count(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss (all of them are after the first position, so no shift is needed)."""
    return int((labels != IGNORE_INDEX).sum())


def loss_scale(step_target_tokens: int, world_size: int, grad_accum_steps: int) -> float:
    """Factor for a micro-batch's summed loss so the optimizer step sees the mean over all its target tokens.

    accelerate divides each micro-batch loss by grad_accum_steps and DDP averages gradients over processes;
    both are undone here, and the sum is divided by the step's target tokens over every micro-batch and process.
    """
    return world_size * grad_accum_steps / step_target_tokens


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the targets (each times its weight, when `weights` is given).

    `logits` is [n_targets, vocab]: one row per True of `predicting_positions(labels)`, in row-major order
    (what `logits_to_keep=predicting_positions(labels)` returns).
    """
    is_target = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][is_target]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {targets.shape[0]} targets; use predicting_positions")
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_token * weights[:, 1:][is_target]).sum()


def packed_attention_mask(segment_ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """[rows, 1, length, n_prefix + length] bool: a token sees the shared prefix and the earlier tokens of its own
    example, never another example's (True = attend; SDPA's convention)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal & same
    allowed = torch.cat([allowed.new_ones(allowed.shape[0], length, n_prefix), allowed], dim=2)
    return allowed[:, None]


def prefix_cache(model, prefix_ids: torch.Tensor, batch: int, **forward_kwargs) -> DynamicCache:
    """Run the shared prefix once (batch size 1) and broadcast its KV cache to `batch` rows (no copy; gradients
    flow back through the one prefix forward)."""
    out = model(input_ids=prefix_ids, use_cache=True, **forward_kwargs)
    return DynamicCache(
        ddp_cache_data=[
            (layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)) for layer in out.cache.layers
        ]
    )


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


def label_log_likelihoods(model, tree: LabelTree, input_ids, attention_mask, position_ids, prefix_ids=None):
    """log p(label tokens + end-of-turn | prompt) for every label: a [batch, n_labels] tensor (differentiable).

    The batch holds left-padded prompts (after `prefix_ids`, which runs once and is broadcast). The prompt runs once;
    then the label trie runs as one short continuation from the prompt's cache, each node seeing the prompt and its
    own ancestors. This is both what scoring ranks and what the label-softmax objective trains.
    """
    batch, device = input_ids.shape[0], input_ids.device
    n_prefix = 0 if prefix_ids is None else prefix_ids.shape[1]
    cache = prefix_cache(model, prefix_ids, batch, logits_to_keep=1) if n_prefix else None
    mask = attention_mask.bool()
    if n_prefix:
        mask = torch.cat([mask.new_ones(batch, n_prefix), mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=mask.long(),
        position_ids=position_ids + n_prefix,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    scores = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, tree.first_tokens.to(device)]
    if not len(tree.tokens):
        return scores
    n_nodes = len(tree.tokens)
    # 4D boolean mask (True = attend): every node sees the prompt and its own ancestors.
    node_mask = torch.cat(
        [
            mask[:, None, None, :].expand(batch, 1, n_nodes, -1),
            tree.sees.to(device)[None, None].expand(batch, 1, -1, -1),
        ],
        dim=-1,
    )
    last = position_ids[:, -1:] + n_prefix
    out = model(
        input_ids=tree.tokens.to(device)[None].expand(batch, -1),
        attention_mask=node_mask,
        position_ids=last + 1 + tree.depths.to(device)[None],
        cache=out.cache,
        use_cache=True,
    )
    logits = out.logits.float()  # [batch, nodes, vocab]
    # log p = logit - logsumexp: gather the few needed logits instead of a full log-softmax copy.
    nodes, tokens = tree.step_nodes.to(device), tree.step_tokens.to(device)
    step = logits[:, nodes, tokens] - torch.logsumexp(logits, dim=-1)[:, nodes]  # [batch, labels, steps]
    return scores + (step * tree.step_valid.to(device)).sum(-1)


def last_hidden_state(model, input_ids, attention_mask, position_ids, prefix_ids=None) -> torch.Tensor:
    """The final (normed) hidden state at each row's last prompt token: [batch, hidden]."""
    batch = input_ids.shape[0]
    n_prefix = 0 if prefix_ids is None else prefix_ids.shape[1]
    body = decoder_body(model)
    cache = prefix_cache(body, prefix_ids, batch) if n_prefix else None
    if n_prefix:
        attention_mask = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids + n_prefix,
        cache=cache,
        use_cache=n_prefix > 0,
    )
    return out.last_hidden_state[:, -1]


def decoder_body(model):
    """The decoder stack without the LM head (LlamaModel inside LlamaForCausalLM, through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class AnswerLoss(torch.nn.Module):
    """The training forward: model + masked loss in one call, so DDP/DeepSpeed see exactly one forward.

    With `prefix_ids` (the system turn every prompt starts with), batches hold only what follows it: the prefix
    runs once per micro-batch (batch size 1), its KV cache is broadcast to every row, and gradients still flow
    through it. On the arXiv prompts that prefix is more than half of every example's tokens.

    A batch is either left-padded (`attention_mask`) or packed (`segment_ids`: which example each token belongs
    to; attention is then block-diagonal causal, built here, so no token attends across examples). With `weights`
    (same shape as labels) each target token's cross-entropy is weighted.
    """

    def __init__(self, model, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("prefix_ids", torch.tensor([prefix_ids or []], dtype=torch.long), persistent=False)

    def forward(
        self, input_ids, position_ids, labels, attention_mask=None, segment_ids=None, weights=None
    ) -> torch.Tensor:
        """Summed (weighted) cross-entropy over the batch's target tokens."""
        if (attention_mask is None) == (segment_ids is None):
            raise ValueError("pass attention_mask (padded batch) or segment_ids (packed batch), not both")
        n_prefix, batch = self.prefix_ids.shape[1], input_ids.shape[0]
        cache = prefix_cache(self.model, self.prefix_ids, batch, logits_to_keep=1) if n_prefix else None
        if n_prefix:
            position_ids = position_ids + n_prefix
        if segment_ids is not None:
            # A 4D mask is used as given, so this holds only for SDPA's boolean convention.
            if self.model.config._attn_implementation != "sdpa":
                raise ValueError("packed batches need attn_implementation='sdpa'")
            attention_mask = packed_attention_mask(segment_ids, n_prefix)
        elif n_prefix:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=n_prefix > 0,
            logits_to_keep=predicting_positions(labels),
        )
        return summed_loss(out.logits, labels, weights)


class LabelSoftmaxLoss(torch.nn.Module):
    """Cross-entropy over the allowed labels of their sequence log-likelihoods (`label_log_likelihoods`): the very
    quantity label scoring ranks, so training optimises the decision the scorer makes. Summed over examples."""

    def __init__(self, model, tree: LabelTree, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.tree = tree
        self.register_buffer("prefix_ids", torch.tensor([prefix_ids or []], dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, label_index) -> torch.Tensor:
        prefix = self.prefix_ids if self.prefix_ids.shape[1] else None
        scores = label_log_likelihoods(self.model, self.tree, input_ids, attention_mask, position_ids, prefix)
        return F.cross_entropy(scores, label_index, reduction="sum")


class ClassificationHead(torch.nn.Module):
    """A linear layer from the last prompt token's final hidden state to one logit per label."""

    def __init__(self, hidden_size: int, n_labels: int, std: float = 0.02):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, n_labels)
        torch.nn.init.normal_(self.linear.weight, std=std)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).float()


class HeadLoss(torch.nn.Module):
    """The classification-head objective: cross-entropy of `head(last hidden state)`, summed over examples."""

    def __init__(self, model, head: ClassificationHead, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.head = head
        self.register_buffer("prefix_ids", torch.tensor([prefix_ids or []], dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, label_index) -> torch.Tensor:
        prefix = self.prefix_ids if self.prefix_ids.shape[1] else None
        hidden = last_hidden_state(self.model, input_ids, attention_mask, position_ids, prefix)
        return F.cross_entropy(self.head(hidden), label_index, reduction="sum")


def general_windows(tokenizer, path, window_tokens: int) -> torch.Tensor:
    """A general-text file as non-overlapping windows of `window_tokens` tokens: [n_windows, window_tokens]."""
    from pathlib import Path

    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n = len(ids) // window_tokens
    if n == 0:
        raise ValueError(f"{path}: fewer than {window_tokens} tokens of general text")
    return torch.tensor(ids[: n * window_tokens], dtype=torch.long).view(n, window_tokens)


def kl_base_to_model(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ model) of next-token distributions, averaged over every position: [batch, length, vocab] inputs."""
    base_log_p = torch.log_softmax(base_logits.float(), dim=-1)
    log_q = torch.log_softmax(logits.float(), dim=-1)
    return (base_log_p.exp() * (base_log_p - log_q)).sum(-1).mean()


class KLRegularisedLoss(AnswerLoss):
    """The answer-token loss plus β · KL(base ‖ model) on general text, a forgetting penalty: each micro-batch also
    runs `n_windows` windows of general text (drawn with the step's seeded generator, so a resumed run draws the same
    ones) through the model and through its base, and adds β times their mean KL, weighted by the micro-batch's target
    tokens so that the step's loss is mean answer loss + β · mean KL. The base is the same model with its adapter
    switched off (no second copy), or, for full fine-tuning, `reference`, a frozen copy taken before training."""

    def __init__(self, model, prefix_ids, windows: torch.Tensor, beta: float, n_windows: int, reference=None):
        super().__init__(model, prefix_ids)
        self.register_buffer("windows", windows, persistent=False)
        self.beta, self.n_windows, self.reference = beta, n_windows, reference

    def forward(self, input_ids, position_ids, labels, **kwargs) -> torch.Tensor:
        answer = super().forward(input_ids, position_ids, labels, **kwargs)
        pick = torch.randint(len(self.windows), (self.n_windows,))
        text = self.windows[pick.to(self.windows.device)]
        return answer + self.beta * self.penalty(text) * target_token_count(labels)

    def penalty(self, text: torch.Tensor) -> torch.Tensor:
        """Mean KL(base ‖ model) over the positions of `text` [windows, tokens] (differentiable in the model)."""
        with torch.no_grad():
            if self.reference is not None:
                base = self.reference(input_ids=text).logits
            else:
                with self.model.disable_adapter():
                    base = self.model(input_ids=text).logits
        return kl_base_to_model(base, self.model(input_ids=text).logits)
