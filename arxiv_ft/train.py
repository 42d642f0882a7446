"""Fine-tune a causal LM to name an arXiv paper's primary category; evaluate before and after; measure what it
forgot and what it cost; leave a run folder that infer.py and `Classifier.from_pretrained` load.

    accelerate launch train.py                                    # the default run (README command 1)
    accelerate launch -m arxiv_ft.train --method full --learning_rate 2e-5 --output_dir runs/full
    arxiv-ft train --config presets/compare/lora.yaml --seed 1 --output-dir runs/lora-s1
    arxiv-ft train --help                                         # every option (HF/TRL names accepted)

From Python: `metrics = arxiv_ft.train.train(TrainConfig(...))`; no signal handlers unless `handle_signals=True`.
The loss is on what `--objective` names (the answer tokens by default), normalised over the whole optimizer step;
evaluation scores every allowed label (arxiv_ft/scoring.py). See arxiv_ft/rundir.py for what the folder holds.
"""

from __future__ import annotations

import logging
import sys
import time

from arxiv_ft.options import TrainConfig

logger = logging.getLogger("arxiv_ft")


def train(cfg: TrainConfig, *, handle_signals: bool = False) -> dict:
    """Run the fine-tune `cfg` describes and return its metrics (before/after scores, forgetting, cost, ...).

    With `handle_signals`, SIGTERM/SIGUSR1 make every process finish its step, save a checkpoint and raise
    `arxiv_ft.fit.Stopped` (the command line turns it into exit status 75); rerunning resumes.
    """
    from arxiv_ft.checkpoints import GracefulStop

    started = time.perf_counter()
    stopper = GracefulStop(install=handle_signals)  # first: a stop signal during start-up must not be lost
    # Heavy libraries load here, after the command line is parsed: `--help` and a bad option answer at once.
    from arxiv_ft import phases as ph
    from arxiv_ft.fit import Stopped

    launch = lock = None
    try:
        launch = ph.start(cfg)
        lock = ph.claim_output(cfg, launch)
        task = ph.load_task(cfg, launch)
        trainable = ph.build(cfg, launch, task)
        run = ph.Run(cfg, launch, task, trainable, ph.setup_fit(cfg, launch, task, trainable))
        state, before = ph.resume(run)
        probes_base = ph.probe_base(run)
        if before is None and cfg.eval_before:
            before = ph.zero_shot_evaluation(run)
        tfidf = ph.tfidf_rows(cfg, launch, task)

        def stop_requested() -> bool:
            return stopper.should_stop(launch.accelerator)

        def stop_if_asked() -> None:  # after training too: a stop signal is honoured, never swallowed
            ph.stop_if_asked(run, stop_requested, state, before)

        state = ph.fit_run(run, state, before, stop_requested)
        if cfg.checkpoint_every_steps:  # so a crash in what follows loses no training
            ph.ensure_checkpoint(run, state, before)
        stop_if_asked()
        after = ph.run_evaluation(run, "fine-tuned")
        stop_if_asked()
        test = ph.run_test(run)
        stop_if_asked()
        forgetting = ph.probe_tuned(run, probes_base)
        stop_if_asked()
        scored = {"before": before, "after": after, "test": test, "tfidf": tfidf, "forgetting": forgetting}
        metrics = ph.collect_metrics(run, state, scored, started)
        ph.save_run(run, metrics)
        ph.write_ledger(run, metrics)
        ph.finish(run, metrics)
        return metrics
    except Stopped as stop:
        if launch is not None:
            launch.log(f"stopped by signal after step {stop.step}; checkpoint saved; the same command resumes")
        raise
    finally:
        stopper.restore()
        if lock is not None:
            lock.release()
        if launch is not None:
            launch.accelerator.end_training()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The command line: parse, set up logging, train; exit 75 after a stop signal (Slurm requeues on it)."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.logs import setup_logging

    cfg = parse_config(TrainConfig, argv, __doc__, prog)
    setup_logging()
    from arxiv_ft.checkpoints import EXIT_PREEMPTED
    from arxiv_ft.fit import Stopped

    try:
        train(cfg, handle_signals=True)
    except Stopped:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
