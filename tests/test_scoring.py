"""Label scoring: batched == one-by-one == naive per-label forward passes; prefix cache and label trie are exact."""

from __future__ import annotations

import pytest
import torch

from arxiv_ft.data import PromptBuilder
from arxiv_ft.prompts import get_template
from arxiv_ft.records import Record
from arxiv_ft.scoring import LabelScorer, LabelTree, generate_labels, parse_generated
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def setup(tokenizer, labels, train_records):
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, max_seq_tokens=600)
    model = make_tiny_llama(tokenizer, seed=1)
    # Papers of very different lengths, so batches really pad.
    records = train_records[:5] + [Record("short", "Tiny", "Short.", ("cs.LG",))]
    return builder, model, records


def naive_scores(model, builder, prompt):
    """One full forward pass per label over prompt + label + end-of-turn: the slow, obviously right way."""
    out = []
    for label in builder.labels:
        target = builder.label_targets[label]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0].float(), -1)
        out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(target)))
    return torch.tensor(out)


def test_batched_scoring_equals_one_by_one_and_naive(setup, tokenizer):
    builder, model, records = setup
    prompts = [builder.prompt_ids(r) for r in records]
    assert len({len(p) for p in prompts}) > 2
    scorer = LabelScorer(model, builder, tokenizer.pad_token_id)
    batched = scorer.score_prompts(prompts)
    single = torch.cat([scorer.score_prompts([p]) for p in prompts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    for row in (0, len(prompts) - 1):
        torch.testing.assert_close(batched[row], naive_scores(model, builder, prompts[row]), rtol=1e-4, atol=1e-4)
    no_prefix = LabelScorer(model, builder, tokenizer.pad_token_id, use_prefix_cache=False)
    torch.testing.assert_close(no_prefix.score_prompts(prompts), batched, rtol=1e-4, atol=1e-4)


def test_predictions_keep_input_order_and_probabilities_sum_to_one(setup, tokenizer):
    builder, model, records = setup
    scorer = LabelScorer(model, builder, tokenizer.pad_token_id)
    preds = scorer.predict(records, batch_size=4)
    assert [p.id for p in preds] == [r.id for r in records]
    for p, row in zip(preds, scorer.score_prompts([builder.prompt_ids(r) for r in records])):
        assert p.predicted == builder.labels[int(row.argmax())]
        assert abs(sum(p.probs) - 1) < 1e-5 and max(p.probs) == p.probs[builder.labels.index(p.predicted)]


def test_label_tree_shares_prefixes_and_handles_unequal_lengths():
    tree = LabelTree([[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 9]])
    # nodes: (1), (1,2), (1,2,3), (1,2,4), (1,5)
    assert tree.tokens.tolist() == [1, 2, 3, 4, 5]
    assert tree.depths.tolist() == [0, 1, 2, 2, 1]
    assert tree.sees[2].tolist() == [True, True, True, False, False]
    assert tree.sees[4].tolist() == [True, False, False, False, True]
    assert tree.step_valid.sum(1).tolist() == [3, 3, 2]


def test_scoring_labels_of_unequal_token_length(tokenizer):
    labels = ["cs.LG", "math.CO", "q-bio.NC"]  # 3 to 6 tokens
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, max_seq_tokens=200)
    assert len({len(t) for t in builder.label_targets.values()}) > 1
    model = make_tiny_llama(tokenizer, seed=2)
    prompts = [builder.prompt_ids(Record(str(i), f"Title {i}", "Abstract " * i, ("cs.LG",))) for i in (1, 7)]
    scores = LabelScorer(model, builder, tokenizer.pad_token_id).score_prompts(prompts)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(scores[row], naive_scores(model, builder, prompt), rtol=1e-4, atol=1e-4)


def test_generation_mode_is_batched_like_one_by_one(setup, tokenizer):
    builder, model, records = setup
    batched = generate_labels(model, tokenizer, builder, records, batch_size=6)
    single = [generate_labels(model, tokenizer, builder, [r], batch_size=1)[0] for r in records]
    assert batched == single


def test_parse_generated():
    labels = ["cs.AI", "cs.LG", "cs.CL"]
    assert parse_generated(" cs.LG\n", labels) == "cs.LG"
    assert parse_generated("The category is cs.CL, maybe cs.AI", labels) == "cs.CL"
    assert parse_generated("machine learning", labels) is None
    assert parse_generated("cs.LGX", labels) is None and parse_generated("xcs.LG", labels) is None  # not substrings
    assert parse_generated("CS.lg", labels) == "cs.LG" and parse_generated("It is cs.CL.", labels) == "cs.CL"


def test_a_label_set_too_large_to_score_is_refused_before_the_model_loads(
    tokenizer, tiny_model_dir, tmp_path, monkeypatch
):
    """10,000 labels made training allocate 26 GB after 7 minutes (at its first evaluation) and die; the estimate grows
    with trie nodes x vocabulary, is made before any weight loads, and names a batch size that fits."""
    from transformers import AutoConfig

    from arxiv_ft import scoring
    from arxiv_ft.scoring import check_scoring_memory, trie_memory_bytes, trie_nodes
    from tests.conftest import FAST_TRAIN, run_train

    config = AutoConfig.from_pretrained(tiny_model_dir)
    template = get_template("arxiv-v1")
    small = PromptBuilder(tokenizer, template, [f"cs.{c}{d}" for c in "ABCDEFG" for d in "XYZ"], 160)
    big = PromptBuilder(tokenizer, template, [f"x{i:05d}.Y" for i in range(3000)], 160)
    # The count matches the trie scoring builds, and the estimate grows with it.
    assert trie_nodes(small) == len(LabelTree([small.label_targets[x] for x in small.labels]).tokens)
    assert trie_memory_bytes(big, config, 16) > 50 * trie_memory_bytes(small, config, 16)
    check_scoring_memory(small, config, 16, "cpu", "--eval-batch-size")  # 21 labels: far below any machine
    monkeypatch.setattr(scoring, "memory_available", lambda device: 2 * trie_memory_bytes(big, config, 5))
    with pytest.raises(SystemExit, match=r"scoring 3,000 labels at --eval-batch-size 16 needs .*--eval-batch-size 5"):
        check_scoring_memory(big, config, 16, "cpu", "--eval-batch-size")
    # In a training run, before the base loads (no weights read, no step taken).
    monkeypatch.setattr(scoring, "memory_available", lambda device: 1 << 20)
    from arxiv_ft import methods

    monkeypatch.setattr(methods.Method, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", tiny_model_dir, "--output-dir", str(tmp_path / "run"), *FAST_TRAIN]
    with pytest.raises(SystemExit, match=r"scoring 21 labels at --eval-batch-size 21 needs .*use fewer labels"):
        run_train(argv)


def test_every_arxiv_category_is_scored_in_one_trie_forward(tokenizer):
    """The every-category task's 58 labels plus the 79 categories it leaves out: all 137 primaries of the shared dump.
    Scored as one trie continuation (two forwards per batch whatever the number of labels), equal to one full forward
    per label; the trie shares prefixes (`math.`, `cond-mat.`, `astro-ph.`) instead of growing as labels x tokens."""
    from arxiv_ft.scoring import trie_nodes
    from tests.conftest import ROOT

    folder = ROOT / "data" / "all-arxiv"
    labels = (folder / "labels.txt").read_text().split()
    others = [line.split("\t")[0] for line in (folder / "other-categories.txt").read_text().splitlines()]
    every = sorted(labels + others)
    assert len(labels) == 58 and len(every) == 137
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), every, max_seq_tokens=2000)
    nodes, flat = trie_nodes(builder), sum(len(t) - 1 for t in builder.label_targets.values())
    assert nodes < 0.6 * flat, (nodes, flat)
    model = make_tiny_llama(tokenizer, seed=3)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    prompts = [builder.prompt_ids(Record(str(i), f"Title {i}", "Abstract " * i, ("cs.LG",))) for i in (1, 9)]
    scores = LabelScorer(model, builder, tokenizer.pad_token_id).score_prompts(prompts)
    assert scores.shape == (2, 137) and len(calls) == 3  # the shared prefix, the papers, the label trie
    sample = every[::9]  # one full forward per label is slow at this prompt length: 16 labels across the set
    targets_only = PromptBuilder(tokenizer, get_template("arxiv-v1"), sample, max_seq_tokens=2000)  # same targets
    want = naive_scores(model, targets_only, prompts[1])  # over the 137-label prompt
    got = torch.stack([scores[1, every.index(x)] for x in sample])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_level_prompt_groups_labels_by_archive_and_scores_the_same_answers(tokenizer):
    """`arxiv-v2-two-level` lists every label once, one line per archive, and asks for the archive first; the answer
    is still the category id, so its label targets are arxiv-v1's and the trie scores equal per-label forwards."""
    labels = ["astro-ph.GA", "cs.AI", "astro-ph.CO", "hep-ph", "cs.LG", "math.AG"]
    flat, grouped = get_template("arxiv-v1"), get_template("arxiv-v2-two-level")
    system = grouped.messages("T", "A", labels)[0]["content"]
    lines = system.split("\n")[1:]
    assert lines == ["astro-ph: astro-ph.GA, astro-ph.CO", "cs: cs.AI, cs.LG", "hep-ph: hep-ph", "math: math.AG"]
    assert flat.messages("T", "A", labels)[0]["content"].endswith(", ".join(labels) + ".")
    two, one = (PromptBuilder(tokenizer, t, labels, max_seq_tokens=300) for t in (grouped, flat))
    assert two.label_targets == one.label_targets
    record = Record("x", "Galaxy rotation curves", "We measure dark matter in galaxies.", ("astro-ph.GA",))
    assert two.prompt_ids(record) != one.prompt_ids(record)
    model = make_tiny_llama(tokenizer, seed=4)
    prompt = two.prompt_ids(record)
    scores = LabelScorer(model, two, tokenizer.pad_token_id).score_prompts([prompt])
    torch.testing.assert_close(scores[0], naive_scores(model, two, prompt), rtol=1e-4, atol=1e-4)
