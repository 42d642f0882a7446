"""What training minimises: one table of objectives, each owning what differs between them.

An objective knows which options it refuses (`check`), how it wraps the model into the module that returns the
step's summed loss (`build`, from `arxiv_ft.loss`), how a micro-batch is collated (`collate`) and what one example
adds to the step's loss normaliser (`units`: its target tokens, their weights, or one example). Every list of
objectives and every branch on one reads this table (the methods table, `arxiv_ft.methods`, does the same for what
trains); adding an objective is adding an entry here.

This module imports nothing heavy at the top: `--help` lists the objectives without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    """The answer-tokens objective, and the base of the others: mean cross-entropy over the answer tokens (the label
    and the end-of-turn token), normalised over the whole optimizer step."""

    name: str = "answer-tokens"
    help: str = "mean cross-entropy over the answer tokens (label + end-of-turn)"
    whole_prompts: bool = False  # scores every label from the prompt alone: collates prompts, cannot pack
    no_packing: str = ""  # why this objective cannot take --packing ("" = it can, unless whole_prompts)
    needs_prefix_cache: bool = False  # continues from the prompt's KV cache: no gradient checkpointing
    trie_in_training: bool = False  # every training step runs the label trie (its memory grows with the labels)
    scores_with_head: bool = False  # evaluation reads a classification head instead of scoring the label trie

    def check(self, cfg) -> None:
        """Refuse the options this objective cannot honour (before anything loads)."""
        reason = "scores whole prompts" if self.whole_prompts else self.no_packing
        if reason and cfg.packing:
            raise ValueError(f"--objective {self.name} {reason}: it does not take --packing")
        if self.needs_prefix_cache and cfg.gradient_checkpointing:
            raise ValueError(f"--objective {self.name} continues from the prompt's KV cache: no checkpointing")

    def build(self, cfg, model, builder, labels: list[str], prefix: list[int], device):
        """(the module whose forward returns the summed loss, the classification head or None), for a run's `cfg`."""
        from arxiv_ft.loss import AnswerLoss

        return AnswerLoss(model, prefix), None

    def collate(self, cfg, pad_id: int, n_prefix: int, builder) -> Callable:
        """Examples -> one micro-batch's tensors."""
        from arxiv_ft.data import collate_left_padded, collate_packed

        if cfg.packing:
            return lambda examples: collate_packed(examples, n_prefix)
        return lambda examples: collate_left_padded(examples, pad_id, n_prefix)

    def units(self, cfg, builder) -> Callable:
        """Example -> what it adds to the step's loss normaliser."""
        return lambda example: float(len(example.target_ids))


@dataclass(frozen=True)
class DecisionWeighted(Objective):
    """The answer tokens, with the token(s) that decide the label weighted by --decision-weight."""

    name: str = "decision-weighted"
    help: str = "the same with the label-deciding token(s) weighted by --decision-weight"

    no_packing: str = "weights tokens of padded rows"  # packed rows carry no per-token weights

    def collate(self, cfg, pad_id: int, n_prefix: int, builder) -> Callable:
        from arxiv_ft.data import collate_left_padded

        weight, decisions = cfg.decision_weight, builder.label_decisions
        return lambda examples: collate_left_padded(examples, pad_id, n_prefix, weight, decisions)

    def units(self, cfg, builder) -> Callable:
        weight, decisions = cfg.decision_weight, builder.label_decisions
        return lambda example: sum(weight if d else 1.0 for d in decisions[example.label_index])


@dataclass(frozen=True)
class LabelSoftmax(Objective):
    """Cross-entropy over the allowed labels of their sequence log-likelihoods: what label scoring ranks."""

    name: str = "label-softmax"
    help: str = "cross-entropy over the labels' sequence log-likelihoods (what scoring ranks)"
    whole_prompts: bool = True
    needs_prefix_cache: bool = True
    trie_in_training: bool = True

    def build(self, cfg, model, builder, labels: list[str], prefix: list[int], device):
        from arxiv_ft.loss import LabelSoftmaxLoss, LabelTree

        tree = LabelTree([builder.label_targets[label] for label in labels])
        return LabelSoftmaxLoss(model, tree, prefix), None

    def collate(self, cfg, pad_id: int, n_prefix: int, builder) -> Callable:
        from arxiv_ft.data import collate_prompts

        return lambda examples: collate_prompts(examples, pad_id, n_prefix)

    def units(self, cfg, builder) -> Callable:
        return lambda example: 1.0


@dataclass(frozen=True)
class ClassificationHead(LabelSoftmax):
    """A linear head from the last prompt token's hidden state to one logit per label (saved beside the weights)."""

    name: str = "cls-head"
    help: str = "a linear head on the last prompt token"
    needs_prefix_cache: bool = False
    trie_in_training: bool = False
    scores_with_head: bool = True

    def build(self, cfg, model, builder, labels: list[str], prefix: list[int], device):
        from arxiv_ft.loss import ClassificationHead as Head
        from arxiv_ft.loss import HeadLoss

        head = Head(model.config.hidden_size, len(labels)).to(device)
        return HeadLoss(model, head, prefix), head


@dataclass(frozen=True)
class KLRegularised(Objective):
    """The answer tokens plus a forgetting penalty: β · KL(base ‖ model) on general text (loss.KLRegularisedLoss)."""

    name: str = "kl-regularised"
    help: str = "the answer tokens + --kl-beta x KL(base || model) on general text (--kl-text), a forgetting penalty"

    no_packing: str = "adds general text to padded batches"

    def build(self, cfg, model, builder, labels: list[str], prefix: list[int], device):
        import copy

        from arxiv_ft.loss import KLRegularisedLoss, general_windows

        windows = general_windows(builder.tokenizer, cfg.kl_text, cfg.kl_window_tokens).to(device)
        reference = None
        if not hasattr(model, "disable_adapter"):  # full fine-tuning: a frozen copy of the base, taken before training
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise SystemExit(f"--objective {self.name} with full fine-tuning needs an unsharded copy: not ZeRO-3")
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return KLRegularisedLoss(model, prefix, windows, cfg.kl_beta, cfg.kl_windows, reference), None


OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (Objective(), DecisionWeighted(), LabelSoftmax(), ClassificationHead(), KLRegularised())
}


def get_objective(name: str) -> Objective:
    """The table's entry, or a ValueError naming the choices."""
    if name not in OBJECTIVES:
        raise ValueError(f"--objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
