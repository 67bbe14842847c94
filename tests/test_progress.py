"""What a run and a study print while they train."""

from __future__ import annotations

import io

from pipeline.config.overrides import count_jobs, sweep_values
from pipeline.progress import STUDY_JOBS_ENV, STUDY_STARTED_ENV, STUDY_WORKERS_ENV, EpochProgress, clock

METRICS = {"train_epoch_loss": 0.5, "val_nll_float64": 0.25, "val_clipped_fraction": 0.125}


def test_non_interactive_output_is_about_ten_lines_per_run():
    out = io.StringIO()
    progress = EpochProgress("logits-seed0", epochs=100, stream=out, interactive=False)
    for epoch in range(1, 101):
        progress(epoch, METRICS)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # epoch 1, every 10th, and the last (100 is both)
    assert lines[0].startswith("logits-seed0 epoch 1/100  loss 0.5  val_nll 0.25  clipped 12.5%")
    assert lines[-1].startswith("logits-seed0 epoch 100/100") and "~0:00 left" in lines[-1]
    assert "\r" not in out.getvalue()


def test_interactive_output_rewrites_one_line():
    out = io.StringIO()
    progress = EpochProgress("probs-seed1", epochs=3, stream=out, interactive=True)
    for epoch in range(1, 4):
        progress(epoch, METRICS)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")


def test_in_a_study_each_line_says_which_job_of_how_many(monkeypatch):
    monkeypatch.setenv(STUDY_JOBS_ENV, "15")
    monkeypatch.setenv(STUDY_STARTED_ENV, "0")
    out = io.StringIO()
    EpochProgress("probs-seed0", epochs=10, job=3, stream=out, interactive=False)(1, METRICS)
    assert out.getvalue().startswith("job 4/15 (study ")


def test_the_estimate_starts_after_the_first_epoch_which_also_pays_for_tracing(monkeypatch):
    """A resumed run: created at 0 s, its first epoch (61) done at 10 s (building and tracing too), the next
    at 11 s: 1 s an epoch, 38 left. The first line gives no estimate: one epoch with the tracing in it
    would have said 6:30 (a fresh run's first line said 3 hours for a 1-minute study)."""
    times = iter([0.0, 10.0, 11.0])
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(times))
    out = io.StringIO()
    progress = EpochProgress("logits-seed0", epochs=100, first_epoch=61, stream=out, interactive=True)
    progress(61, METRICS)
    assert "epoch 61/100" in out.getvalue() and "0:10 elapsed" in out.getvalue() and "left" not in out.getvalue()
    progress(62, METRICS)
    assert out.getvalue().split("\r")[-1].endswith("0:11 elapsed, ~0:38 left")


def sweep_size(lines: list[str]) -> int:
    return count_jobs(sweep_values(lines)[1])


def test_sweep_size_is_the_product_of_the_sweeps_and_the_command_line_wins():
    assert sweep_size(["loss=probs,logits,probs_naive", "seed=range(5)"]) == 15
    # A preset's sweeper params come first; the command line's sweep of the same key replaces them.
    assert sweep_size(["loss=probs,logits,probs_naive", "seed=range(5)", "seed=0,1"]) == 6
    # ... and so does a single value: the study below runs 2 jobs, not 10.
    assert sweep_size(["loss=probs,logits,probs_naive", "seed=range(5)", "seed=0", "loss=logits,probs"]) == 2
    assert sweep_size(["train.epochs=2"]) == 1


def test_clock_format():
    assert (clock(5), clock(65), clock(3725)) == ("0:05", "1:05", "1:02:05")


def test_the_study_estimate_counts_parallel_workers(monkeypatch):
    """Job 5 of 20 (0-based 4) on 2 workers: its first epoch took 3 s, then 1 s an epoch, so a job lasts
    3 + 9 = 12 s. At its epoch 5: 5 s of this job left; jobs 0-5 have started, the 14 others take 14 x 12 / 2
    = 84 s on the 2 workers: 89 s left in all."""
    monkeypatch.setenv(STUDY_JOBS_ENV, "20")
    monkeypatch.setenv(STUDY_WORKERS_ENV, "2")
    monkeypatch.setenv(STUDY_STARTED_ENV, "1000")
    monkeypatch.setattr("pipeline.progress.time.time", lambda: 1025.0)
    times = iter([0.0, 3.0, 7.0])
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(times))
    out = io.StringIO()
    progress = EpochProgress("probs-seed4", epochs=10, job=4, stream=out, interactive=False)
    progress(1, METRICS)
    progress(5, METRICS)
    first, fifth = out.getvalue().splitlines()
    assert first.startswith("job 5/20 (study 0:25)  probs-seed4 epoch 1/10")
    assert fifth.startswith("job 5/20 (study 0:25, ~1:29 left)  probs-seed4 epoch 5/10")
    assert fifth.endswith("0:07 elapsed, ~0:05 left")


def test_the_study_estimate_follows_this_workers_pace_once_it_has_finished_two_jobs(monkeypatch):
    """A study's jobs differ (the atlas mixes settings and backends; a job's first epoch may pay for tracing or
    not): once this worker has ended two jobs, each job not started is charged the mean time between its job
    ends. Jobs 1 and 3 (0-based 0 and 2) ended 8 s apart; job 5's first epoch took 10 s (tracing), then 1 s
    an epoch: 1 s of it left, and 14 jobs not started take 14 x 8 / 2 = 56 s on 2 workers: 57 s, where its
    own first epoch would have said 14 x 12 / 2 + 1 = 85 s."""
    monkeypatch.setattr("pipeline.progress._JOB_ENDS", {})
    monkeypatch.setenv(STUDY_JOBS_ENV, "20")
    monkeypatch.setenv(STUDY_WORKERS_ENV, "2")
    monkeypatch.setenv(STUDY_STARTED_ENV, "2000")
    monkeypatch.setattr("pipeline.progress.time.time", lambda: 2030.0)
    times = iter([0.0, 1.0, 2.0, 8.0, 8.0, 9.0, 10.0, 16.0, 16.0, 26.0, 27.0])
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(times))
    for job in (0, 2):
        finished = EpochProgress(f"logits-seed{job}", epochs=3, job=job, stream=io.StringIO(), interactive=False)
        for epoch in (1, 2, 3):
            finished(epoch, METRICS)
    out = io.StringIO()
    progress = EpochProgress("probs-seed4", epochs=3, job=4, stream=out, interactive=True)
    progress(1, METRICS)
    progress(2, METRICS)
    assert out.getvalue().split("\r")[-1].startswith("\033[Kjob 5/20 (study 0:30, ~0:57 left)  probs-seed4 epoch 2/3")
