"""What a run leaves behind and who can use it: checkpoints and best/ load like the run itself, only what trains is
checkpointed, a finished run is never overwritten silently, the model card, the adapter's base by Hub id, the
merged folder in plain transformers, the Python API."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arxiv_ft import Classifier
from arxiv_ft.checkpoints import complete_checkpoints
from arxiv_ft.rundir import RunDir
from tests.conftest import ASSETS, FAST_TRAIN, run_train

FAST = [*FAST_TRAIN, "--probes", "false", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def hub_model(tiny_model_dir, tmp_path_factory):
    """The tiny model as if it came from the Hub: a local folder that names its Hub id, and that id in a local Hub
    cache (so transformers and peft find it offline by id, as on a machine that downloaded it)."""
    folder = tmp_path_factory.mktemp("hub-model") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "arxiv_ft_source.json").write_text(json.dumps({"hub_id": "arxiv-ft-test/tiny-llama"}))
    cache = tmp_path_factory.mktemp("hub-cache")
    commit = "0" * 40
    snapshot = cache / "models--arxiv-ft-test--tiny-llama" / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    return folder, cache


@pytest.fixture(scope="module")
def lora_run(hub_model, tmp_path_factory):
    """A finished LoRA run (7 steps, checkpoints every 3, evaluation every 3 keeping best/)."""
    out = tmp_path_factory.mktemp("run") / "lora"
    argv = ["--model", str(hub_model[0]), "--output-dir", str(out), "--checkpoint-every-steps", "3"]
    metrics = run_train([*argv, "--eval-every-steps", "3", "--keep-checkpoints", "5", *FAST])
    return out, metrics


def test_checkpoints_hold_only_what_trains_and_load_like_the_run(lora_run, hub_model):
    out, metrics = lora_run
    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(out)]
    assert steps == [3, 6, 7]  # every 3 steps, and the last one (so a crash after training loses nothing)
    last = complete_checkpoints(out)[-1]
    names = {p.name for p in last.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json", "labels.txt"} <= names
    assert not any(n.startswith("model") or n.endswith(".pkl") or n.endswith(".bin") for n in names)
    base_bytes = sum(p.stat().st_size for p in hub_model[0].glob("*.safetensors"))
    checkpoint_bytes = sum(p.stat().st_size for p in last.iterdir())
    assert checkpoint_bytes < base_bytes / 2  # adapter + optimizer, not the frozen base
    # The last checkpoint is the finished model: it predicts exactly what the run folder predicts.
    papers = [json.loads(line) for line in (ASSETS / "cs-validation-sample.jsonl").read_text().splitlines()[:6]]
    from_run = Classifier.from_pretrained(out, device="cpu").predict(papers)
    from_checkpoint = Classifier.from_pretrained(last, device="cpu").predict(papers)
    assert from_run == from_checkpoint


def test_best_folder_holds_the_best_evaluation(lora_run):
    out, metrics = lora_run
    evals = metrics["train"]["evals"]
    assert [e["step"] for e in evals] == [3, 6, 7]
    best = max(evals, key=lambda e: e["macro_f1"])
    saved = json.loads((out / "best" / "metrics.json").read_text())
    assert saved["step"] == metrics["train"]["best"]["step"] and saved["eval"]["macro_f1"] == best["macro_f1"]
    RunDir(out / "best").check()  # loadable like a run folder


def test_model_card_and_adapter_base_by_hub_id(lora_run, hub_model, monkeypatch):
    out, metrics = lora_run
    card = (out / "README.md").read_text()
    assert "base_model: arxiv-ft-test/tiny-llama" in card and "library_name: peft" in card
    for needle in ("cs.LG", "arxiv-v1", "TF-IDF", "accuracy", "Reproduce", "train"):
        assert needle in card
    # What a reader elsewhere needs, and nothing of this machine: the Hub's model-index and dataset, the whole
    # reproduction (revision, setup, command), no absolute path, no placeholder link.
    assert "model-index:" in card and "type: text-classification" in card and "datasets:\n- " in card
    assert "git checkout" in card and "bash tools/setup.sh" in card and "https://github.com/)" not in card
    assert str(out) not in card and str(Path.home()) not in card and "/arxiv_ft/assets/" not in card
    assert "`arxiv_ft/assets/cs-train-sample.jsonl`" in card
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "arxiv-ft-test/tiny-llama"
    base = json.loads((out / "base_model.json").read_text())
    assert base["hub_id"] == "arxiv-ft-test/tiny-llama" and len(base["fingerprint"]) == 32
    # peft alone, on another machine that has the base from the Hub: the folder loads by Hub id.
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_model[1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_model[1]))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ours = RunDir(out).load_model(torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits)


def test_a_base_that_moved_or_changed_is_refused(lora_run, tmp_path):
    out, _ = lora_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "best"))
    record = json.loads((copy / "base_model.json").read_text())
    record["fingerprint"] = "f" * 32
    (copy / "base_model.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not the one this run was trained on"):
        RunDir(copy).load_model(torch.float32)
    record |= {"path": str(tmp_path / "gone"), "hub_id": None}
    (copy / "base_model.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="not here"):
        RunDir(copy).load_model(torch.float32)


def test_a_finished_run_is_never_overwritten_silently(lora_run, tiny_model_dir, tmp_path):
    out = tmp_path / "reused"
    shutil.copytree(lora_run[0], out)
    before = (out / "ledger.json").read_bytes()
    with pytest.raises(SystemExit, match="finished run"):
        run_train(["--model", tiny_model_dir, "--method", "full", "--output-dir", str(out), *FAST])
    assert (out / "ledger.json").read_bytes() == before  # nothing of the first run was touched
    # Asked to: the old run's files go, and the loader follows the new method, not the files that happen to exist.
    argv = ["--model", tiny_model_dir, "--method", "full", "--output-dir", str(out), "--overwrite-output-dir"]
    run_train([*argv, "--lr", "1e-3", "--eval-before", "false", *FAST[:-2]])
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").exists()
    assert RunDir(out).method().name == "full" and not (out / "best").exists()
    assert all("adapter" not in p.name for c in complete_checkpoints(out) for p in c.iterdir())


def test_resume_none_into_old_checkpoints_is_refused(lora_run, tiny_model_dir, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(lora_run[0], out)
    (out / "ledger.json").unlink()  # an unfinished run with checkpoints
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(SystemExit, match="--resume none"):
        run_train(["--model", tiny_model_dir, "--output-dir", str(out), "--resume", "none", *FAST])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def test_an_empty_evaluation_set_stops_before_training(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no evaluation papers"):
        run_train(["--model", tiny_model_dir, "--eval-file", str(empty), "--output-dir", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_train_from_python_touches_no_signal_handlers(tiny_model_dir, tmp_path):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    metrics = run_train(["--model", tiny_model_dir, "--output-dir", str(tmp_path / "py"), "--max-steps", "1", *FAST])
    assert metrics["after"]["score"]["n"] == 21
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_classifier_predicts_label_and_top_k_in_input_order(lora_run):
    out, _ = lora_run
    clf = Classifier.from_pretrained(out, device="cpu")
    papers = [json.loads(line) for line in (ASSETS / "cs-validation-sample.jsonl").read_text().splitlines()[:5]]
    papers.append({"title": "A short paper", "abstract": "We show a thing."})  # no id, no category: fine
    preds = clf.predict(papers, top_k=4, batch_size=2)
    assert [p["id"] for p in preds[:5]] == [p["id"] for p in papers[:5]] and preds[5]["id"] == "5"
    for p in preds:
        labels = [label for label, _ in p["top_k"]]
        probs = [prob for _, prob in p["top_k"]]
        assert p["label"] == labels[0] and len(labels) == 4 and probs == sorted(probs, reverse=True)
        assert set(labels) <= set(clf.labels)
    with pytest.raises(ValueError, match="paper 0"):
        clf.predict([{"title": "no abstract"}])


def test_merged_folder_answers_with_the_same_labels_in_plain_transformers(lora_run, tmp_path):
    """The merged model, loaded by plain transformers and asked by greedy generation, names the labels the
    adapter model names (generation is how vLLM or any server would use it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.merge import merge_run
    from arxiv_ft.records import read_records
    from arxiv_ft.scoring import generate_labels

    out, _ = lora_run
    merged = merge_run(out, tmp_path / "merged")
    card = (merged / "README.md").read_text()  # the merged folder has its card, as a plain transformers model
    assert "library_name: transformers" in card and "adapter folded into the base weights" in card
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    run = RunDir(out)
    records = list(read_records(ASSETS / "cs-validation-sample.jsonl"))[:6]
    adapter = Classifier.from_pretrained(out, device="cpu")
    builder = PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels())
    want = generate_labels(adapter.model, adapter.tokenizer, adapter.builder, records, 6)
    got = generate_labels(plain, tokenizer, builder, records, 6)
    assert [g[0] for g in got] == [w[0] for w in want]  # the same text, token for token
    merged_preds, adapter_preds = (
        Classifier.from_pretrained(merged, device="cpu").predict(records),
        adapter.predict(records),
    )
    # Merging W + BA in fp32 changes the last bits: the same labels, probabilities to 1e-4.
    assert [(p["label"], [lab for lab, _ in p["top_k"]]) for p in merged_preds] == [
        (p["label"], [lab for lab, _ in p["top_k"]]) for p in adapter_preds
    ]
    for m, a in zip(merged_preds, adapter_preds):
        assert [prob for _, prob in m["top_k"]] == pytest.approx([prob for _, prob in a["top_k"]], abs=1e-4)


def test_push_to_hub_uploads_the_run_folder_from_the_main_process(tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pushed"
    run_train(["--model", tiny_model_dir, "--output-dir", str(out), "--max-steps", "1", "--push-to-hub", "me/x", *FAST])
    assert calls[0] == ("create", "me/x") and calls[1][0] == "upload"
    assert {"README.md", "adapter_model.safetensors", "ledger.json", "labels.txt"} <= set(calls[1][2])


def test_dora_trains_magnitude_and_direction_and_reloads_identically(tiny_model_dir, tmp_path):
    out = tmp_path / "dora"
    metrics = run_train(["--model", tiny_model_dir, "--method", "dora", "--output-dir", str(out), *FAST])
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved) and any("lora_B" in k for k in saved)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["method"] == "dora" and metrics["cost"]["trainable_parameters"] > 0
    from arxiv_ft.records import per_class_sample, read_records

    records = per_class_sample(list(read_records(ASSETS / "cs-validation-sample.jsonl")), 1, seed=0)
    preds = Classifier.from_pretrained(out, device="cpu").predict(records)
    accuracy = sum(p["label"] == r.primary for p, r in zip(preds, records)) / len(records)
    assert accuracy == pytest.approx(metrics["after"]["score"]["accuracy"])  # the reloaded model is the trained one


# ------------------------------------------------------------------------- what is never deleted (issue #25 1-3)


def test_merge_never_deletes_what_it_did_not_write(lora_run, tmp_path):
    """`merge --out` refuses the run itself, a folder holding it, the base, and a folder holding someone's files; it
    replaces only an earlier merge of the same run."""
    from arxiv_ft.merge import merge_run

    out, _ = lora_run
    before = sorted(p.name for p in out.iterdir())
    for target in (out, out.parent):
        with pytest.raises(SystemExit, match="is or holds the run"):
            merge_run(out, target)
    assert sorted(p.name for p in out.iterdir()) == before
    base = Path(RunDir(out).base_record()["path"])
    with pytest.raises(SystemExit, match="base model"):
        merge_run(out, base / "merged")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an earlier merge"):
        merge_run(out, users)
    assert (users / "notes.txt").read_text() == "keep me"
    merged = merge_run(out, tmp_path / "merged")
    assert merge_run(out, merged) == merged  # an earlier merge of the same run is replaced
    assert not (merged / ".merge-partial").exists()


def test_train_refuses_an_output_folder_that_is_the_base_or_holds_foreign_files(tiny_model_dir, tmp_path):
    """The base model's folder (or one inside it, or the data) as --output-dir is refused before anything is written;
    a folder of someone else's files is refused unless --overwrite-output-dir."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    for out in (model, model / "run"):
        with pytest.raises(SystemExit, match="overlaps --model"):
            run_train(["--model", str(model), "--output-dir", str(out), *FAST])
        with pytest.raises(SystemExit, match="overlaps --model"):
            run_train(["--model", str(model), "--output-dir", str(out), "--overwrite-output-dir", *FAST])
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files  # nothing written there, not even a lock
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ASSETS / "cs-train-sample.jsonl", data / "train.jsonl")
    with pytest.raises(SystemExit, match="overlaps --train-file"):
        run_train(["--model", str(model), "--train-file", str(data / "train.jsonl"), "--output-dir", str(data), *FAST])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("README.md", "config.json", "tokenizer.json"):
        (theirs / name).write_text(f"the user's {name}")
    with pytest.raises(SystemExit, match="holds no run of arxiv-ft"):
        run_train(["--model", str(model), "--output-dir", str(theirs), *FAST])
    assert all((theirs / n).read_text() == f"the user's {n}" for n in ("README.md", "config.json", "tokenizer.json"))


def test_a_checkpoint_that_fails_its_manifest_is_refused_for_inference(lora_run, tmp_path):
    """A checkpoint whose adapter no longer matches its COMPLETE manifest (changed bytes) is not loaded by
    Classifier.from_pretrained or infer.py: it would predict something no run trained."""
    from arxiv_ft import config as cfglib
    from arxiv_ft import infer

    out, _ = lora_run
    copy = tmp_path / "ckpt"
    shutil.copytree(complete_checkpoints(out)[-1], copy)
    adapter = copy / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-8:] = b"\x00" * 8  # same size, other weights
    adapter.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="does not match its checksum"):
        Classifier.from_pretrained(copy, device="cpu")
    papers = tmp_path / "papers.jsonl"
    shutil.copy(ASSETS / "cs-validation-sample.jsonl", papers)
    argv = ["--model-dir", str(copy), "--input", str(papers), "--output", str(tmp_path / "p.jsonl")]
    with pytest.raises(SystemExit, match="does not match its checksum"):
        infer.infer(cfglib.parse_config(infer.InferConfig, [*argv, "--progress", "false"], ""))


def test_eval_mode_generate_finishes_with_a_ledger(tiny_model_dir, tmp_path):
    """--eval-mode generate (the tutorial's way) ended every run with `LedgerError: task.after is required`."""
    from arxiv_ft.ledger import Ledger

    out = tmp_path / "gen"
    run_train(["--model", tiny_model_dir, "--output-dir", str(out), "--eval-mode", "generate", *FAST])
    ledger = Ledger.read(out / "ledger.json")
    assert ledger.task["after"]["n"] == 21 and ledger.test["after"]["n"] == 21


@pytest.mark.parametrize("damage", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_damaged_adapter_is_named_not_a_library_traceback(lora_run, tmp_path, damage):
    out = tmp_path / "copy"
    shutil.copytree(lora_run[0], out, ignore=shutil.ignore_patterns("checkpoints", "best"))
    path = out / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut short: invalid JSON, a torn tensor file
    with pytest.raises(SystemExit, match=f"{out}: the lora weights cannot be loaded .*adapter_model.safetensors"):
        Classifier.from_pretrained(out, device="cpu")
    # infer.py fails the same way, and leaves neither its lock nor a run record behind (nothing was predicted).
    from arxiv_ft import config as cfglib
    from arxiv_ft import infer

    papers, preds = tmp_path / "papers.jsonl", tmp_path / "out" / "p.jsonl"
    shutil.copy(ASSETS / "cs-validation-sample.jsonl", papers)
    argv = ["--model-dir", str(out), "--input", str(papers), "--output", str(preds), "--progress", "false"]
    with pytest.raises(SystemExit, match="cannot be loaded"):
        infer.infer(cfglib.parse_config(infer.InferConfig, argv, ""))
    assert not preds.parent.exists() or list(preds.parent.iterdir()) == []


def test_best_and_checkpoints_carry_their_own_tokenizer_not_the_folder_around_them(lora_run, tmp_path):
    """best/ copied into a folder that holds another tokenizer and chat template was loaded with the parent's."""
    out, _ = lora_run
    assert (out / "best" / "tokenizer_config.json").is_file()  # a checkpoint reads its run's (it stays small)
    assert RunDir(complete_checkpoints(out)[-1]).owner() == out.resolve()
    parent = tmp_path / "elsewhere"
    shutil.copytree(out / "best", parent / "best")
    trained = RunDir(out).load_tokenizer().chat_template
    foreign = RunDir(out).load_tokenizer()
    foreign.chat_template = "{% for m in messages %}FOREIGN {{ m['content'] }}{% endfor %}"
    foreign.save_pretrained(parent)
    assert RunDir(parent / "best").load_tokenizer().chat_template == trained
    # A best/ written before best/ carried a tokenizer takes its own run's, never an unrelated folder's.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (parent / "best" / name).unlink(missing_ok=True)
    assert RunDir(parent / "best").owner() is None
    assert "FOREIGN" not in (RunDir(parent / "best").load_tokenizer().chat_template or "")
    assert RunDir(out / "best").owner() == out.resolve()


def test_a_changed_or_linked_label_file_is_refused(lora_run, tmp_path):
    """labels.txt reordered, cut to one label, or a link to a file elsewhere: the model's answers would be read as
    other labels; each is refused naming the file."""
    out = tmp_path / "copy"
    shutil.copytree(lora_run[0], out, ignore=shutil.ignore_patterns("checkpoints", "best"))
    labels = (out / "labels.txt").read_text().split()
    (out / "labels.txt").write_text("\n".join(reversed(labels)) + "\n")
    with pytest.raises(SystemExit, match="labels.txt: 21 labels .* differ from the 21 this model was trained with"):
        Classifier.from_pretrained(out, device="cpu")
    (out / "labels.txt").write_text(labels[0] + "\n")
    with pytest.raises(SystemExit, match="differ from the 21"):
        Classifier.from_pretrained(out, device="cpu")
    elsewhere = tmp_path / "other-labels.txt"
    elsewhere.write_text("\n".join(labels) + "\n")
    (out / "labels.txt").unlink()
    (out / "labels.txt").symlink_to(elsewhere)
    with pytest.raises(SystemExit, match="is a link to .*outside the run folder"):
        Classifier.from_pretrained(out, device="cpu")
    (out / "labels.txt").unlink()
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    assert Classifier.from_pretrained(out, device="cpu").labels == labels


def test_a_chat_template_that_loops_without_bound_is_stopped(tokenizer, labels, monkeypatch):
    """A chat_template.jinja with nested loops of 10^10 iterations made Classifier.from_pretrained run for minutes."""
    import copy
    import time

    from arxiv_ft import data
    from arxiv_ft.prompts import PromptSpec

    slow = copy.deepcopy(tokenizer)
    slow.chat_template = (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}"
        "{% endfor %}{% endfor %}"
    )
    monkeypatch.setattr(data, "TEMPLATE_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(data.ChatTemplateError, match="loops without bound"):
        data.PromptBuilder.from_spec(slow, PromptSpec(), labels)
    assert time.monotonic() - started < 10
    import signal

    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # the handler is put back


def test_stray_folders_among_checkpoints_and_a_lock_that_is_a_folder(lora_run, tmp_path, caplog):
    """checkpoints/step-latest (a user's copy) or step- made resume crash with `invalid literal for int()`; a `.lock`
    that is a folder crashed with IsADirectoryError."""
    from arxiv_ft.checkpoints import find_resume
    from arxiv_ft.fileio import FolderLock

    out = tmp_path / "copy"
    shutil.copytree(lora_run[0], out)
    newest = complete_checkpoints(out)[-1]
    shutil.copytree(newest, out / "checkpoints" / "step-latest")
    (out / "checkpoints" / "step-").write_text("")
    with caplog.at_level("WARNING"):
        assert find_resume(out, "auto")[0] == newest
    assert "step-latest: not a checkpoint of this project" in caplog.text
    (tmp_path / "locked" / ".lock").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"\.lock is a folder where train\.py keeps its lock file"):
        FolderLock(tmp_path / "locked").acquire("train.py")


def test_plain_peft_loads_a_run_folder_offline(lora_run, hub_model):
    """`AutoPeftModelForCausalLM.from_pretrained(run)` looked for the base on the Hub, although it sat here: the run
    registered its base folder under the base's Hub id in the Hugging Face cache (links, no copy)."""
    import huggingface_hub.constants as constants
    from peft import AutoPeftModelForCausalLM

    out, _ = lora_run
    base = json.loads((out / "base_model.json").read_text())
    repo = Path(constants.HF_HUB_CACHE) / f"models--{base['hub_id'].replace('/', '--')}"
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert (snapshot / "model.safetensors").resolve() == (hub_model[0] / "model.safetensors").resolve()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ours = RunDir(out).load_model(torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits)


def test_card_paths_and_licenses_read_the_same_on_another_machine():
    from arxiv_ft.card import ROOT, _license, portable, portable_command

    assert portable(str(ROOT / "data" / "cs-test.jsonl.gz")) == "data/cs-test.jsonl.gz"
    assert portable(str(Path.home() / "papers" / "x.jsonl")) == "~/papers/x.jsonl"
    assert portable("/srv/elsewhere/y.parquet") == "y.parquet" and portable("rel/z.jsonl") == "rel/z.jsonl"
    assert portable_command(f"train.py --model {ROOT}/m --train-file=/srv/a.jsonl --lr 1e-3") == (
        "train.py --model m --train-file=a.jsonl --lr 1e-3"
    )
    assert _license("HuggingFaceTB/SmolLM2-135M-Instruct") == "apache-2.0"
    assert _license("meta-llama/Llama-3.2-1B-Instruct") == "llama3.2" and _license("me/x") is None


def test_a_failed_upload_leaves_the_run_finished_and_arxiv_ft_push_retries_it(tiny_model_dir, tmp_path, monkeypatch):
    """--push-to-hub offline ended the finished run with a traceback, and the same command could not retry (the folder
    is finished): the upload is its own step, `arxiv-ft push RUN --repo R`."""
    import huggingface_hub

    from arxiv_ft import cli

    calls = []

    class OfflineApi:
        def create_repo(self, repo_id, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co'")

    class FakeApi(OfflineApi):
        def create_repo(self, repo_id, **kwargs):
            calls.append(repo_id)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    out = tmp_path / "run"
    argv = ["--model", tiny_model_dir, "--output-dir", str(out), "--max-steps", "1", "--push-to-hub", "me/x", *FAST]
    with pytest.raises(SystemExit, match=r"failed \(OSError: We couldn.t connect.*arxiv-ft push .* --repo me/x"):
        run_train(argv)
    assert RunDir(out).is_finished()
    with pytest.raises(SystemExit, match="failed"):
        cli.main(["push", str(out), "--repo", "me/x"])
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cli.main(["push", str(out), "--repo", "me/x"])
    assert calls[0] == "me/x" and "ledger.json" in calls[1]
    with pytest.raises(SystemExit, match="not a finished run"):
        cli.main(["push", str(complete_checkpoints(out)[-1]), "--repo", "me/x"])
