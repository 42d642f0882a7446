"""infer.py end to end on a tiny random LLaMA: sharding, crash-resume, bad input, model folders, the arXiv API."""

from __future__ import annotations

import gzip
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load_file, save_file

from arxiv_ft import config as cfglib
from arxiv_ft import infer
from arxiv_ft import records as rec
from arxiv_ft.data import PromptBuilder
from arxiv_ft.modeling import load_tokenizer
from arxiv_ft.rundir import RunDir
from arxiv_ft.scoring import LabelScorer
from arxiv_ft.shards import ShardedOutput, read_part
from tests.conftest import ASSETS, ROOT, load_trained, run_train
from tests.test_arxiv_api import FakeArxiv

LABELS = str(ASSETS / "cs-labels.txt")
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# Batches of other papers (other padding, other matmul shapes) change probabilities by ~1e-7: compare with a
# margin, and let labels tied within it swap places.
PROB_TOL = 1e-5
N_PAPERS = 64  # in the reference run, the killed run and the restarts (even)


def run(argv: list[str]) -> dict:
    return infer.infer(cfglib.parse_config(infer.InferConfig, argv, ""))


def zero_shot(model_dir: str, *extra: str) -> list[str]:
    return ["--model", model_dir, "--labels", LABELS, "--max-seq-tokens", "192", "--progress", "false", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def part_indices(out: Path) -> list[int]:
    """The index of every complete line of every part file."""
    return [index for part in ShardedOutput(out).parts() for index, _ in read_part(part)[0]]


def assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    """Same papers in the same order; probabilities equal within PROB_TOL; a different label only at a near-tie."""
    assert [(g["index"], g["id"], g["true"]) for g in got] == [(w["index"], w["id"], w["true"]) for w in want]
    for g, w in zip(got, want):
        gp, wp = dict(g["top_k"]), dict(w["top_k"])
        for label in gp.keys() & wp.keys():
            assert abs(gp[label] - wp[label]) < PROB_TOL, (g, w)
        kth = min(wp.values())
        assert all(abs(gp[label] - kth) < PROB_TOL for label in gp.keys() - wp.keys()), (g, w)
        assert g["predicted"] == w["predicted"] or abs(gp[g["predicted"]] - gp.get(w["predicted"], -1)) < PROB_TOL


def write_papers(path: Path, n: int, source: Path = ASSETS / "cs-train-sample.jsonl") -> Path:
    with open(source, encoding="utf-8") as fh:
        path.write_text("".join(next(fh) for _ in range(n)), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted 1-process run over N_PAPERS papers: (input file, output path, its lines)."""
    folder = tmp_path_factory.mktemp("reference")
    papers = write_papers(folder / "papers.jsonl", N_PAPERS)
    out = folder / "preds.jsonl"
    summary = run(zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--batch-size", "16"))
    assert summary["n_predicted"] == N_PAPERS and summary["n_rejected"] == 0
    return papers, out, read_jsonl(out)


def test_two_processes_match_one_process(tmp_path, tiny_model_dir, reference):
    papers, _, want = reference
    small = write_papers(tmp_path / "papers.jsonl", 40)
    out = tmp_path / "two" / "preds.jsonl"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    argv = zero_shot(tiny_model_dir, "--input", str(small), "--output", str(out), "--batch-size", "8")
    res = subprocess.run(
        [*launch, "infer.py", *argv], cwd=ROOT, env=ENV | {"ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "preds.jsonl.summary.json").read_text())
    assert summary["this_run"]["world_size"] == 2 and len(summary["this_run"]["per_process"]) == 2
    parts = ShardedOutput(out).parts()
    assert [p.name for p in parts] == [f"preds.jsonl.part-0000{r}-of-00002.jsonl" for r in (0, 1)]
    for rank, part in enumerate(parts):
        assert sorted(json.loads(line)["index"] for line in part.read_text().splitlines()) == list(range(rank, 40, 2))
    got = read_jsonl(out)
    assert [g["id"] for g in got] == [r.id for r in rec.read_records(small)]  # each once, in input order
    assert_same_predictions(got, want[:40])  # the first 40 papers of the 1-process run


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir, reference):
    papers, _, want = reference
    out = tmp_path / "preds.jsonl"
    part = tmp_path / "preds.jsonl.part-00000-of-00001.jsonl"
    # Batches of one paper, fsynced one by one: slow enough to be killed mid-way.
    argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out))
    slow = [*argv, "--batch-size", "1", "--window-batches", "1"]
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "infer.py", *slow], cwd=ROOT, env=ENV, stderr=err)
        deadline = time.monotonic() + 180
        while not (part.exists() and part.read_bytes().count(b"\n") >= 10):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = part.read_bytes().count(b"\n")
    assert 10 <= done < N_PAPERS
    with open(part, "ab") as fh:  # as if the crash had come in the middle of writing a line
        fh.write(b'{"index": 9999, "id": "2401.0')

    summary = run([*argv, "--batch-size", "16"])

    assert summary["this_run"]["already_done_at_start"] == done
    assert summary["this_run"]["processed"] == N_PAPERS - done
    assert sorted(part_indices(out)) == list(range(N_PAPERS))  # nothing twice, nothing lost, the half line gone
    assert_same_predictions(read_jsonl(out), want)


def test_restart_with_another_world_size(tmp_path, tiny_model_dir, reference):
    """Parts left by a 2-process run (one of them cut short mid-line) are finished by 1 process."""
    papers, ref_out, want = reference
    out = tmp_path / "preds.jsonl"
    shutil.copy(ref_out.with_name(ref_out.name + ".run.json"), tmp_path / "preds.jsonl.run.json")
    lines = ref_out.read_text().splitlines(keepends=True)
    (tmp_path / "preds.jsonl.part-00000-of-00002.jsonl").write_text("".join(lines[0::2]))
    (tmp_path / "preds.jsonl.part-00001-of-00002.jsonl").write_text("".join(lines[1:40:2]) + lines[41][:20])

    summary = run(zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--batch-size", "8"))

    assert summary["this_run"]["already_done_at_start"] == N_PAPERS // 2 + 20
    assert summary["this_run"]["processed"] == N_PAPERS // 2 - 20
    assert sorted(part_indices(out)) == list(range(N_PAPERS))
    assert_same_predictions(read_jsonl(out), want)


def test_resume_with_other_arguments_is_refused(tmp_path, tiny_model_dir, reference):
    papers, ref_out, _ = reference
    out = tmp_path / "preds.jsonl"
    shutil.copy(ref_out.with_name(ref_out.name + ".run.json"), tmp_path / "preds.jsonl.run.json")
    with pytest.raises(SystemExit, match="started with a different labels"):
        run(
            ["--model", tiny_model_dir, "--labels", "cs.LG,cs.CL", "--max-seq-tokens", "192", "--input", str(papers)]
            + ["--output", str(out)]
        )


def good(rid: str, category: str = "cs.LG", **extra) -> dict:
    return {"id": rid, "title": f"Paper {rid}", "abstract": f"We study {rid}.", "categories": category, **extra}


def test_bad_lines_are_rejected_with_line_numbers_and_the_rest_classified(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    lines = [
        json.dumps(good("a", authors="X. Y.", versions=[{"version": "v1"}], license=None)).encode(),  # extra fields
        b'{"id": "b", "title": "Broken',  # malformed JSON
        json.dumps({"id": "c", "abstract": "No title.", "categories": "cs.LG"}).encode(),
        json.dumps(good("d") | {"abstract": "   "}).encode(),
        b'{"id": "e", "title": "Bad \xff\xfe bytes", "abstract": "x", "categories": "cs.LG"}',
        b"",  # blank: not an item
        json.dumps(good("f", "cs.CL")).encode(),
        json.dumps(good("g") | {"title": "long " * 400}).encode(),  # no prompt fits 192 tokens
        json.dumps(good("h", "math.CO cs.LG")).encode(),  # true label outside the label set
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    whole = gzip.compress(write_papers(tmp_path / "whole.jsonl", 24).read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    items = [(str(p), n, x) for p in (bad, cut) for n, x in rec.iter_records_and_rejects(p)]
    n_gz = sum(isinstance(x, rec.Record) for p, _, x in items if p == str(cut))
    assert 0 < n_gz < 24 and isinstance(items[-1][2], rec.Reject)
    out = tmp_path / "preds.jsonl"
    argv = zero_shot(tiny_model_dir, "--input", f"{bad},{cut}", "--output", str(out), "--batch-size", "4")

    summary = run([*argv, "--max-reject-fraction", "0.5"])

    got = read_jsonl(out)
    gz_ids = [x.id for p, _, x in items if p == str(cut) and isinstance(x, rec.Record)]
    assert [g["id"] for g in got] == ["a", "f", "h", *gz_ids]
    # Each row says whether its true category is one the model can answer ("h" is math.CO: flagged, not hidden).
    assert [g["true_in_label_set"] for g in got[:3]] == [True, True, False]
    assert [g["index"] for g in got] == [0, 5, 7] + list(range(8, 8 + n_gz))  # the blank line has no index
    rejects = read_jsonl(tmp_path / "preds.jsonl.rejects.jsonl")
    assert [(r["path"], r["line_no"]) for r in rejects] == [(str(bad), n) for n in (2, 3, 4, 5, 8)] + [
        (str(cut), items[-1][1])
    ]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("malformed JSON") and reasons[1] == "missing field 'title'"
    assert reasons[2] == "empty 'abstract'" and reasons[3].startswith("invalid UTF-8")
    assert reasons[4].startswith("prompt does not fit") and reasons[5].startswith("truncated or corrupt gzip")
    assert '"id": "g"' in rejects[4]["text"] and "Broken" in rejects[0]["text"]
    assert summary["n_items"] == 8 + n_gz + 1 and summary["n_rejected"] == 6 and summary["n_predicted"] == 3 + n_gz
    assert summary["n_true_out_of_label_set"] == 1 and summary["out_of_label_set"] == {"math.CO": 1}
    # "g" could not be classified (no prompt fits) but its label is in the set: it counts as wrong, as in train.
    assert summary["metrics"]["n"] == 3 + n_gz and summary["n_unfit_counted_wrong"] == 1
    assert not summary["over_reject_limit"]

    # The same run with the default limit: nothing left to classify, everything rewritten, exit status 3.
    monkeypatch.setattr(sys, "argv", ["infer.py", *argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "infer.py"), run_name="__main__")
    assert exc.value.code == 3
    assert "6 of" in capsys.readouterr().err and read_jsonl(out) == got


def test_generate_mode(tmp_path, tiny_model_dir):
    papers = write_papers(tmp_path / "papers.jsonl", 4)
    out = tmp_path / "gen.jsonl"
    argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--max-new-tokens", "4")

    summary = run([*argv, "--mode", "generate"])

    got = read_jsonl(out)
    assert [g["id"] for g in got] == [r.id for r in rec.read_records(papers)]
    for g in got:  # a random model's text rarely names a label: predicted is then null, and counted as wrong
        assert isinstance(g["generated"], str) and "top_k" not in g and "confidence" not in g
        assert g["predicted"] is None or g["predicted"] in rec.read_labels(LABELS)
    assert summary["metrics"]["unparsed"] == sum(g["predicted"] is None for g in got)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A real train.py output folder (LoRA adapter on the tiny model, 2 steps)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    argv = ["--model", tiny_model_dir, "--max-steps", "2", "--eval-before", "false", "--eval-per-class", "1"]
    argv += ["--train-per-class", "2", "--max-seq-tokens", "200"]
    argv += ["--output-dir", str(out), "--log-every-steps", "100"]
    run_train(argv)
    return out


def test_model_dir_reproduces_labels_template_and_scores(tmp_path, trained_dir, tiny_model_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    papers = write_papers(tmp_path / "papers.jsonl", 12, ASSETS / "cs-validation-sample.jsonl")
    out = tmp_path / "preds.parquet"

    same = ["--template", "arxiv-v1", "--max-seq-tokens", "200"]  # agreeing with the folder is allowed
    run(["--model-dir", str(trained_dir), "--input", str(papers), "--output", str(out), "--progress", "false", *same])

    saved = json.loads((tmp_path / "preds.parquet.run.json").read_text())
    assert saved["labels"] == rec.read_labels(trained_dir / "labels.txt") == rec.read_labels(LABELS)
    assert (saved["template"], saved["max_seq_tokens"]) == ("arxiv-v1", 200)
    # What train.py's own evaluation path computes from the same folder.
    tokenizer = load_tokenizer(str(trained_dir))
    builder = PromptBuilder.from_spec(tokenizer, RunDir(trained_dir).prompt(), saved["labels"])
    scorer = LabelScorer(load_trained(trained_dir), builder, tokenizer.pad_token_id)
    records = list(rec.read_records(papers))
    probs = torch.softmax(scorer.score_prompts([builder.prompt_ids(r) for r in records]), -1)
    table = pq.read_table(out).to_pylist()
    assert [row["id"] for row in table] == [r.id for r in records]
    for row, p in zip(table, probs):
        assert row["predicted"] == saved["labels"][int(p.argmax())] and len(row["top_k"]) == 3
        assert abs(row["top_k"][0]["probability"] - float(p.max())) < PROB_TOL


def test_model_dir_refuses_drift_and_unknown_templates(tmp_path, trained_dir):
    # Refused before anything is fetched: the default API URL is never reached.
    base = ["--model-dir", str(trained_dir), "--arxiv-ids", "1605.08386", "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match="--max-seq-tokens 192 differs"):
        run([*base, "--max-seq-tokens", "192"])
    with pytest.raises(SystemExit, match="--labels .* differs"):
        run([*base, "--labels", "cs.LG,cs.CL"])
    other = tmp_path / "other"
    other.mkdir()
    for name in ("labels.txt", "train_config.json", "adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(trained_dir / name, other / name)
    (other / "prompt.json").write_text(json.dumps({"template": "arxiv-v0-gone", "max_seq_tokens": 200}))
    config = json.loads((other / "train_config.json").read_text()) | {"template": "arxiv-v0-gone"}
    (other / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="unknown prompt template 'arxiv-v0-gone'; known: arxiv-v1"):
        run(["--model-dir", str(other), *base[2:]])


def test_exactly_one_input_and_one_model(tiny_model_dir):
    with pytest.raises(SystemExit):
        run(["--model", tiny_model_dir, "--labels", LABELS])
    with pytest.raises(SystemExit):
        run(["--model", tiny_model_dir, "--input", "a.jsonl", "--query", "x", "--labels", LABELS])
    with pytest.raises(SystemExit):
        run(["--model", tiny_model_dir, "--input", "a.jsonl"])  # zero-shot needs --labels


@pytest.fixture
def api():
    """The recorded arXiv API fixtures served on 127.0.0.1 (tests/test_arxiv_api.py's FakeArxiv)."""
    fake = FakeArxiv()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = fake.answer(urlsplit(self.path).query)
            self.send_response(answer.status)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_port}/api/query"
    yield fake
    server.shutdown()
    server.server_close()


def test_arxiv_ids_and_query_through_the_api(tmp_path, tiny_model_dir, api):
    common = zero_shot(tiny_model_dir, "--api-base-url", api.url, "--api-min-interval-s", "0")
    out = tmp_path / "ids.jsonl"
    run([*common, "--arxiv-ids", "0808.05394,1707.08567", "--output", str(out)])
    (line,) = read_jsonl(out)  # 0808.05394 does not exist
    assert (line["id"], line["true"]) == ("1707.08567", "cs.IT") and line["predicted"] in line["top_k"][0]

    out = tmp_path / "query.jsonl"
    query = [*common, "--query", "testing", "--max-results", "10", "--sort-by", "relevance", "--output", str(out)]
    summary = run(query)
    got = read_jsonl(out)
    assert [g["id"] for g in got][:3] == ["2202.12139", "2405.13786", "2005.14124"] and len(got) == 10
    assert got[0]["true"] == "cs.SE"
    assert summary["n_true_in_label_set"] + summary["n_true_out_of_label_set"] == 10
    n_requests = len(api.requests)
    run(query)  # a rerun reads the fetched list again instead of asking the API: same papers, same order
    assert len(api.requests) == n_requests and read_jsonl(out) == got
    with pytest.raises(SystemExit, match="started with a different input"):
        run([*query[:-2], "--max-results", "5", "--output", str(out)])


def test_an_output_that_is_an_input_is_refused(tmp_path, tiny_model_dir):
    papers = write_papers(tmp_path / "papers.jsonl", 4)
    before = papers.read_bytes()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        run(zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(papers)))
    assert papers.read_bytes() == before


def test_resume_refuses_another_model_dtype_or_generation_length(tmp_path, trained_dir, tiny_model_dir):
    """A model folder retrained in place is another model: its output is not resumed with the new one's lines."""
    papers = write_papers(tmp_path / "papers.jsonl", 4)
    model_dir = tmp_path / "model"
    shutil.copytree(trained_dir, model_dir)
    out = tmp_path / "preds.jsonl"
    argv = ["--model-dir", str(model_dir), "--input", str(papers), "--output", str(out), "--progress", "false"]
    run(argv)
    with pytest.raises(SystemExit, match="different dtype"):
        run([*argv, "--dtype", "bf16"])
    adapter = load_file(model_dir / "adapter_model.safetensors")
    save_file({k: v + 0.01 for k, v in adapter.items()}, model_dir / "adapter_model.safetensors")  # "retrained"
    with pytest.raises(SystemExit, match="different fingerprint"):
        run(argv)
    gen = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(tmp_path / "g.jsonl"), "--mode", "generate")
    run([*gen, "--max-new-tokens", "4"])
    with pytest.raises(SystemExit, match="different max_new_tokens"):
        run([*gen, "--max-new-tokens", "6"])


def test_a_surrogate_line_is_rejected_and_every_rerun_finishes(tmp_path, tiny_model_dir):
    papers = write_papers(tmp_path / "papers.jsonl", 3)
    lines = papers.read_text().splitlines()
    bad = [
        json.dumps(good("t") | {"title": "x"}).replace('"x"', '"\\ud800"'),
        json.dumps(good("i")).replace('"i"', '"\\udfff"', 1),
    ]
    papers.write_text("\n".join([lines[0], *bad, *lines[1:]]) + "\n")
    out = tmp_path / "preds.jsonl.gz"
    argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--max-reject-fraction", "0.5")
    for _ in range(2):
        summary = run(argv)
        assert summary["n_predicted"] == 3 and summary["n_rejected"] == 2
    assert gzip.decompress(out.read_bytes()).count(b"\n") == 3  # .jsonl.gz output is gzipped
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "preds.jsonl.gz.rejects.jsonl")]
    assert all("surrogate" in r for r in reasons)


def test_a_second_identical_inference_stops_at_once(tmp_path, tiny_model_dir):
    papers = write_papers(tmp_path / "papers.jsonl", 2000)  # one at a time: minutes, while the second starts
    out = tmp_path / "preds.jsonl"
    slow = [*zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out)), "--batch-size", "1"]
    first = subprocess.Popen([sys.executable, "infer.py", *slow, "--window-batches", "1"], cwd=ROOT, env=ENV)
    try:
        part = tmp_path / "preds.jsonl.part-00000-of-00001.jsonl"
        deadline = time.monotonic() + 180
        while not (part.exists() and part.read_bytes().count(b"\n") >= 2):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "infer.py", *slow], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert first.poll() is None  # the first one was still at work
        assert second.returncode != 0 and "in use by pid" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_resume_refuses_an_input_changed_with_the_same_size(tmp_path, tiny_model_dir, reference):
    """Lines reordered between a kill and the resume: same path, same size, other papers at each index."""
    papers = tmp_path / "papers.jsonl"
    shutil.copy(reference[0], papers)
    out = tmp_path / "preds.jsonl"
    argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--batch-size", "16")
    lines = papers.read_text(encoding="utf-8").splitlines(keepends=True)
    papers.write_text("".join(lines[:16]), encoding="utf-8")
    run(argv)  # stands for the killed run: its parts hold lines for these papers at these indices
    papers.write_text("".join(lines[8:16] + lines[:8]), encoding="utf-8")
    assert papers.stat().st_size == sum(len(line.encode()) for line in lines[:16])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="different input"):
        run(argv)
    assert out.read_bytes() == before


def test_abstention_flags_and_one_schema_for_jsonl_and_parquet(tmp_path, tiny_model_dir):
    """Rows say whether the true category is in the label set, how sure the model is (calibrated top-1 probability,
    mass on the allowed labels), and abstain below the threshold; JSONL and Parquet carry the same fields."""
    pq = pytest.importorskip("pyarrow.parquet")
    papers = write_papers(tmp_path / "papers.jsonl", 8)
    outside = [good(f"m{i}", "math.CO") for i in range(3)]  # real papers' fields, a category the model cannot answer
    with open(papers, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in outside)
    plain = run(zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(tmp_path / "plain.jsonl")))
    rows = read_jsonl(tmp_path / "plain.jsonl")
    threshold = sorted(r["confidence"] for r in rows)[5]  # abstain on the 5 least sure papers
    summaries = {}
    for name in ("a.jsonl", "a.parquet"):
        argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(tmp_path / name))
        summaries[name] = run([*argv, "--abstain-below", str(threshold)])
    jsonl, parquet = read_jsonl(tmp_path / "a.jsonl"), pq.read_table(tmp_path / "a.parquet").to_pylist()

    fields = ["index", "id", "predicted", "top_k", "confidence", "label_mass", "abstained", "true"]
    assert list(jsonl[0]) == list(parquet[0]) == [*fields, "true_in_label_set", "label_set"]
    for j, p, r in zip(jsonl, parquet, rows):
        assert p["top_k"] == [{"label": label, "probability": prob} for label, prob in j["top_k"]]
        assert {k: v for k, v in p.items() if k != "top_k"} == {k: v for k, v in j.items() if k != "top_k"}
        assert j["confidence"] == r["confidence"] == j["top_k"][0][1] and 0 < j["label_mass"] <= 1
        assert j["abstained"] == (r["confidence"] < threshold) and not r["abstained"]
        assert j["predicted"] == (None if j["abstained"] else r["predicted"])
        assert j["true_in_label_set"] == (j["true"] != "math.CO")
    n_abstained = sum(j["abstained"] for j in jsonl)
    assert n_abstained == 5 and plain["n_abstained"] == 0 and plain["metrics_answered"] is None
    s = summaries["a.jsonl"]
    assert s["n_abstained"] == 5 and s["n_true_out_of_label_set"] == 3
    assert s["n_abstained_true_out_of_label_set"] == sum(j["abstained"] and not j["true_in_label_set"] for j in jsonl)
    answered = [j for j in jsonl if j["true_in_label_set"] and not j["abstained"]]
    assert s["metrics_answered"]["n"] == len(answered)
    assert s["metrics_answered"]["accuracy"] == pytest.approx(
        sum(j["predicted"] == j["true"] for j in answered) / len(answered)
    )
    # An abstention counts as wrong over every in-set paper.
    in_set = [j for j in jsonl if j["true_in_label_set"]]
    assert s["metrics"]["accuracy"] == pytest.approx(sum(j["predicted"] == j["true"] for j in in_set) / len(in_set))
    with pytest.raises(SystemExit, match="different abstain"):
        argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(tmp_path / "a.jsonl"))
        run([*argv, "--abstain-below", "0.9"])


def test_temperature_divides_the_label_scores(tmp_path, tiny_model_dir):
    papers = write_papers(tmp_path / "papers.jsonl", 6)
    got = {}
    for t in ("1", "0.25"):
        out = tmp_path / f"t{t}.jsonl"
        argv = zero_shot(tiny_model_dir, "--input", str(papers), "--output", str(out), "--top-k", "21")
        run([*argv, "--temperature", t])
        got[t] = read_jsonl(out)
    for a, b in zip(got["1"], got["0.25"]):
        p = torch.tensor([prob for _, prob in sorted(a["top_k"])], dtype=torch.float64)
        want = torch.softmax(p.log() / 0.25, -1)  # softmax(log softmax(s) / T) = softmax(s / T)
        q = torch.tensor([prob for _, prob in sorted(b["top_k"])], dtype=torch.float64)
        assert torch.allclose(q, want, atol=2e-5) and a["predicted"] == b["predicted"]
        assert a["label_mass"] == b["label_mass"]  # the mass is the model's, not the temperature's


def test_int8_scorer_agrees_with_fp32(tmp_path, trained_dir):
    """int8 dynamic quantisation (adapter merged first) keeps the labels: probabilities within 0.02, and the same
    top label wherever fp32's top two labels are more than 0.02 apart."""
    papers = write_papers(tmp_path / "papers.jsonl", 24, ASSETS / "cs-validation-sample.jsonl")
    got = {}
    for q in ("none", "int8"):
        out = tmp_path / f"{q}.jsonl"
        argv = ["--model-dir", str(trained_dir), "--input", str(papers), "--output", str(out), "--progress", "false"]
        run([*argv, "--quantize", q, "--top-k", "21"])
        got[q] = read_jsonl(out)
    assert json.loads((tmp_path / "int8.jsonl.run.json").read_text())["quantize"] == "int8"
    for a, b in zip(got["none"], got["int8"]):
        pa, pb = dict(a["top_k"]), dict(b["top_k"])
        assert max(abs(pa[k] - pb[k]) for k in pa) < 0.02
        if a["top_k"][0][1] - a["top_k"][1][1] > 0.02:
            assert a["predicted"] == b["predicted"]
    with pytest.raises(SystemExit, match="CPU path"):
        run([*argv, "--quantize", "int8", "--dtype", "bf16", "--output", str(tmp_path / "bf16.jsonl")])


def test_int8_keeps_the_down_projection_and_head_in_fp32(trained_dir):
    """Every linear layer but the MLP's down projection and the head becomes a dynamic int8 layer (per channel)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from arxiv_ft.classifier import Classifier
    from arxiv_ft.modeling import INT8_KEEP_FP32, quantize_int8

    model = quantize_int8(Classifier.from_pretrained(trained_dir, "cpu", "fp32").model, "cpu", torch.float32)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, DynamicLinear)):
            kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(type(module))
    assert {"q_proj", "gate_proj", "down_proj", "lm_head"} <= set(kinds)
    for kind, types in kinds.items():
        assert types == ({torch.nn.Linear} if kind in INT8_KEEP_FP32 else {DynamicLinear}), kind
    assert model.model.layers[0].self_attn.q_proj.weight().qscheme() == torch.per_channel_affine


def test_calibrate_fits_on_validation_and_infer_applies_it(tmp_path, trained_dir):
    from arxiv_ft import calibration

    folder = tmp_path / "run"
    shutil.copytree(trained_dir, folder)
    result = calibration.calibrate(cfglib.parse_config(calibration.CalibrateConfig, ["--model-dir", str(folder)], ""))
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved == result and saved["n"] == 21 and saved["nll_after"] <= saved["nll_before"] + 1e-9
    papers = write_papers(tmp_path / "papers.jsonl", 4)
    out = tmp_path / "preds.jsonl"
    run(["--model-dir", str(folder), "--input", str(papers), "--output", str(out), "--progress", "false"])
    assert json.loads((tmp_path / "preds.jsonl.run.json").read_text())["temperature"] == saved["temperature"]
