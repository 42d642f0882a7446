"""Options: the Hugging Face / TRL names, both spellings, booleans three ways, presets, validation before any model
loads, and clean, fast help for every entry point."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from arxiv_ft.config import parse_config
from arxiv_ft.options import BaselineConfig, FetchConfig, InferConfig, MergeConfig, ReportConfig, TrainConfig
from tests.conftest import ROOT

# (TrainingArguments/TRL name, value on the command line, our field, the value it must hold)
HF_NAMES = [
    ("learning_rate", "1e-3", "lr", 1e-3),
    ("per_device_train_batch_size", "4", "batch_size", 4),
    ("per_device_eval_batch_size", "32", "eval_batch_size", 32),
    ("num_train_epochs", "3", "epochs", 3.0),
    ("max_steps", "7", "max_steps", 7),
    ("gradient_accumulation_steps", "2", "grad_accum_steps", 2),
    ("lr_scheduler_type", "linear", "lr_schedule", "linear"),
    ("warmup_ratio", "0.05", "warmup_ratio", 0.05),
    ("logging_steps", "3", "log_every_steps", 3),
    ("save_steps", "50", "checkpoint_every_steps", 50.0),
    ("save_total_limit", "4", "keep_checkpoints", 4),
    ("eval_steps", "0.25", "eval_every_steps", 0.25),
    ("resume_from_checkpoint", "none", "resume", "none"),
    ("model_name_or_path", "some/model", "model", "some/model"),
    ("max_length", "256", "max_seq_tokens", 256),
    ("lora_r", "8", "lora_rank", 8),
    ("lora_alpha", "16", "lora_alpha", 16.0),
    ("lora_dropout", "0.1", "lora_dropout", 0.1),
    ("lora_target_modules", "q_proj,v_proj", "lora_targets", "q_proj,v_proj"),
    ("use_rslora", "true", "lora_rslora", True),
    ("report_to", "none", "report_to", "none"),  # a tracker must be installed to be accepted (see below)
    ("run_name", "my-run", "run_name", "my-run"),
    ("output_dir", "runs/x", "output_dir", "runs/x"),
    ("seed", "3", "seed", 3),
    ("weight_decay", "0.01", "weight_decay", 0.01),
    ("max_grad_norm", "0.5", "max_grad_norm", 0.5),
    ("gradient_checkpointing", "true", "gradient_checkpointing", True),
    ("torch_dtype", "bf16", "dtype", "bf16"),
    ("hub_model_id", "me/arxiv", "push_to_hub", "me/arxiv"),
]


@pytest.mark.parametrize("hf_name,value,field,expected", HF_NAMES)
@pytest.mark.parametrize("spelling", ["snake", "kebab"])
def test_hf_and_trl_names_set_our_options(hf_name, value, field, expected, spelling):
    flag = "--" + (hf_name if spelling == "snake" else hf_name.replace("_", "-"))
    cfg = parse_config(TrainConfig, [flag, value], "")
    assert getattr(cfg, field) == expected


def test_existing_names_keep_working_in_both_spellings():
    cfg = parse_config(
        TrainConfig, ["--lr", "2e-3", "--batch-size", "4", "--grad_accum_steps", "2", "--epochs", "2"], ""
    )
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum_steps, cfg.epochs) == (2e-3, 4, 2, 2.0)


@pytest.mark.parametrize(
    "argv,expected",
    [
        ([], False),
        (["--packing"], True),
        (["--packing", "true"], True),
        (["--packing", "false"], False),
        (["--packing", "--no-packing"], False),
        (["--no_packing"], False),
    ],
)
def test_booleans_take_a_bare_flag_a_no_flag_and_a_value(argv, expected):
    assert parse_config(TrainConfig, argv, "").packing is expected


def test_a_true_default_can_be_switched_off_both_ways():
    assert parse_config(TrainConfig, ["--no-probes"], "").probes is False
    assert parse_config(TrainConfig, ["--probes", "false"], "").probes is False
    assert parse_config(TrainConfig, ["--bf16"], "").dtype_name == "bf16"


def test_presets_take_any_name_and_flags_override_them(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 1.0e-3\nper-device-train-batch-size: 2\nmethod: full\npacking: true\nepochs: 2\n")
    cfg = parse_config(TrainConfig, ["--config", str(preset), "--epochs", "3"], "")
    assert (cfg.lr, cfg.batch_size, cfg.method, cfg.packing, cfg.epochs) == (1e-3, 2, "full", True, 3.0)


def test_unknown_preset_keys_and_bad_preset_values_are_named(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-4\nepochz: 2\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(preset)], "")
    assert "epochz" in capsys.readouterr().err
    preset.write_text("batch_size: many\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(preset)], "")
    err = capsys.readouterr().err
    assert str(preset) in err and "batch" in err


def test_a_preset_with_yaml_aliases_is_refused_at_once(tmp_path, capsys):
    """A "billion laughs" inside a known key ran for minutes at 2.7 GB; aliases are refused before expansion."""
    import time

    preset = tmp_path / "laughs.yaml"
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    preset.write_text("\n".join(rows) + "\nrun_name: *i\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("run_name: x\n")
    with pytest.raises(SystemExit):  # the parser's imports, outside the timing (slow on a busy machine)
        parse_config(TrainConfig, ["--config", str(plain), "--help"], "")
    capsys.readouterr()
    started = time.perf_counter()
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(preset), "--help"], "")
    # Expanding the aliases takes minutes; refusing them, a parse: 30 s is a bound a loaded machine still meets.
    assert time.perf_counter() - started < 30 and "aliases" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-1"], "--epochs"),
        (["--max-steps", "-3"], "--max-steps"),
        (["--lora-alpha", "-8"], "--lora-alpha"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (["--price-per-device-hour", "-2"], "--price-per-device-hour"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints"),
        (["--log-every-steps", "0"], "--log-every-steps"),
        (["--eval-per-class", "-1"], "--eval-per-class"),
        (["--train-per-class", "-1"], "--train-per-class"),
        (["--lora-dropout", "1"], "--lora-dropout"),
        (["--lr", "0"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--min-lr-ratio", "2"], "--min-lr-ratio"),
        (["--objective", "label-softmax", "--packing"], "--packing"),
        (["--bf16", "--dtype", "fp32"], "--bf16"),
        (["--method", "qlora-ish"], "--method"),
        (["--resume", "/no/such/checkpoint"], "--resume"),
        (["--lr", "inf"], "--lr"),
        (["--lora-alpha", "inf"], "--lora-alpha"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--decision-weight", "inf"], "--decision-weight"),
        (["--epochs", "inf"], "--epochs"),
        (["--eval-every-steps", "inf"], "--eval-every-steps"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--max-steps", "1000000000000000"], "--max-steps"),
        (["--cpu-threads", "10000"], "--cpu-threads"),
        (["--report-to", "tensorboard"], "pip install tensorboard"),  # not installed here: refused, not ignored
        (["--report-to", "neptune"], "--report-to"),
    ],
)
def test_bad_values_stop_before_anything_loads_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(TrainConfig, argv, "")
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_infer_options_are_checked_too(tmp_path, capsys):
    for argv, named in [
        (["--input", ",", "--model-dir", "x"], "--input"),
        (["--input", "a.jsonl", "--model-dir", "x", "--output", str(tmp_path)], "--output"),
        (["--input", "a.jsonl", "--model-dir", "x", "--max-reject-fraction", "2"], "--max-reject-fraction"),
    ]:
        with pytest.raises(SystemExit):
            parse_config(InferConfig, argv, "")
        assert named in capsys.readouterr().err


def test_positional_arguments_of_report_merge_and_fetch():
    assert parse_config(ReportConfig, ["runs/a", "runs/b", "--out", "r"], "").paths == "runs/a,runs/b"
    assert parse_config(MergeConfig, ["runs/a", "--out", "m"], "").run_dir == "runs/a"
    assert parse_config(FetchConfig, ["--ids", "2401.1", "cs/0101001", "--out", "o"], "").ids == "2401.1,cs/0101001"
    assert parse_config(BaselineConfig, ["--train-per-class", "3"], "").train_per_class == 3


ENTRY_POINTS = [
    [sys.executable, "train.py"],
    [sys.executable, "infer.py"],
    [sys.executable, "-m", "arxiv_ft.train"],
    [sys.executable, "-m", "arxiv_ft.cli", "train"],
    [sys.executable, "-m", "arxiv_ft.cli", "infer"],
    [sys.executable, "-m", "arxiv_ft.cli", "baseline"],
    [sys.executable, "-m", "arxiv_ft.cli", "report"],
    [sys.executable, "-m", "arxiv_ft.cli", "merge"],
    [sys.executable, "-m", "arxiv_ft.cli", "fetch"],
]


@pytest.mark.parametrize("command", ENTRY_POINTS, ids=lambda c: " ".join(c[1:]))
def test_help_is_clean_and_loads_no_heavy_library(command):
    """No raw argparse dictionary, no unexpanded `%(`; and --help never imports torch (so it answers at once:
    the time is measured in benchmarks/RESULTS.md, not asserted here)."""
    probe = "import sys, runpy; sys.argv = sys.argv[1:]; "
    if command[1] == "-m":
        probe += f"sys.argv[0] = {command[2]!r}; runpy.run_module({command[2]!r}, run_name='__main__')"
        argv = [*command[3:], "--help"]
    else:
        probe += f"runpy.run_path({command[1]!r}, run_name='__main__')"
        argv = ["--help"]
    check = "import atexit, sys; atexit.register(lambda: print('TORCH-LOADED' if 'torch' in sys.modules else ''))"
    res = subprocess.run(
        [sys.executable, "-c", check + "\n" + probe, "x", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "option_strings" not in res.stdout and "%(" not in res.stdout and "usage:" in res.stdout
    assert "TORCH-LOADED" not in res.stdout


def test_arxiv_ft_without_a_subcommand_lists_them():
    res = subprocess.run([sys.executable, "-m", "arxiv_ft.cli"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and all(name in res.stdout for name in ("train", "infer", "report", "fetch"))


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_parses_validates_and_names_files_that_exist(preset, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name their data relative to the repository, where their commands run
    cfg = parse_config(TrainConfig, ["--config", str(preset)], "")
    for path in (p for p in (cfg.train_file, cfg.eval_file, cfg.test_path) if p):
        assert (ROOT / path).exists(), f"{preset.name} names {path}, which is not in the repository"


def test_train_help_is_grouped_in_sections_that_hold_every_option(capsys):
    sections = TrainConfig._sections
    listed = [name for names in sections.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig)) and len(set(listed)) == len(listed)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"], "")
    out = capsys.readouterr().out
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", *sections]
    assert "(default: )" not in out and "turn --probes off" in out
    assert parse_config(TrainConfig, ["--no-probes", "--no-probe-kl"], "").probes is False
    assert parse_config(TrainConfig, [], "").probe_kl is True


def test_the_shipped_test_split_goes_with_the_shipped_validation_split_only():
    """`--test-file auto`: a run on the shipped papers is scored on the shipped test papers; a run on the user's own
    evaluation file is not scored on papers of another task (the user names a test file, or gets none)."""
    assert TrainConfig().test_path.endswith("cs-test-sample.jsonl")
    assert TrainConfig(eval_file="mine.jsonl").test_path == ""
    assert TrainConfig(eval_file="mine.jsonl", test_file="their-test.jsonl").test_path == "their-test.jsonl"
    assert TrainConfig(test_file="").test_path == ""


def test_trl_switches_are_translated_and_the_rest_answered_in_one_line(capsys):
    """TRL's own switches were refused with 57 lines of usage, and `--push_to_hub True --hub_model_id me/x` pushed to
    a repository named "True"."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.options import TrainConfig

    def parse(*argv):
        return parse_config(TrainConfig, list(argv), "", prog="train.py")

    assert parse("--use_peft").method == "lora"
    assert parse("--load_in_4bit", "True").method == "qlora" and parse("--load-in-4bit=true").method == "qlora"
    assert parse("--use_dora", "--method", "lora").method == "lora"  # the later flag wins, as everywhere
    assert parse("--use_dora").method == "dora" and parse("--use_dora", "false").method == "lora"
    assert parse("--dataset_name", "papers.jsonl").train_file == "papers.jsonl"
    assert parse("--push_to_hub", "True", "--hub_model_id", "me/x").push_to_hub == "me/x"
    assert parse("--hub_model_id", "me/x", "--push_to_hub", "true").push_to_hub == "me/x"
    assert parse("--push_to_hub", "me/y").push_to_hub == "me/y" and parse("--push_to_hub", "false").push_to_hub == ""
    for argv, answer in [
        (["--push_to_hub", "True"], "--push_to_hub true: name the repository with --hub_model_id USER/NAME"),
        (["--eval_strategy", "steps"], "--eval_strategy has no counterpart here: evaluation runs at the end, and"),
        (["--optim", "adamw_torch"], "--optim has no counterpart here: the optimizer is AdamW"),
        (["--lora-rnak", "8"], "unrecognized arguments: --lora-rnak 8; --lora-rnak: did you mean --lora-rank?"),
    ]:
        with pytest.raises(SystemExit) as stop:
            parse(*argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and answer in err and len(err.strip().splitlines()) == 1, err
