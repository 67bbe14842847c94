"""Where the default study's time goes: runs `make study`'s two commands and breaks the wall time down.

    python benchmarks/study_time.py

Every run logs `seconds_data`, `seconds_train`, `seconds_evaluate`, `seconds_logging`; a study's parent
run logs `seconds_compare`. The rest of the wall time is process start-up (imports: measured here
separately) and Hydra's own work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["seed_mnist", "seed_logistic"]


def timed(*command: str) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return time.perf_counter() - started


def main() -> int:
    sys.path.insert(0, str(ROOT))
    imports = timed(sys.executable, "-c", "import pipeline.run, pipeline.train, pipeline.evaluate, pipeline.report, mlflow")
    # One job at a time, so that the per-run seconds add up to the wall time.
    wall = {study: timed(sys.executable, "-m", "pipeline.run", "-m", f"experiment={study}", "hydra/launcher=basic")
            for study in STUDIES}

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("fromlogits")
    print(f"{'study':<14} {'wall s':>7} {'runs':>5} {'imports':>8} {'data':>6} {'train':>7} {'evaluate':>9} "
          f"{'logging':>8} {'compare':>8} {'other':>6}")
    for study in STUDIES:
        (parent,) = client.search_runs([experiment.experiment_id], f"tags.role = 'study' and tags.study = '{study}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        parts = {k: sum(r.data.metrics.get(f"seconds_{k}", 0.0) for r in children) for k in ["data", "train", "evaluate", "logging"]}
        parts["compare"] = parent.data.metrics.get("seconds_report", 0.0)
        other = wall[study] - imports - sum(parts.values())
        print(f"{study:<14} {wall[study]:>7.1f} {len(children):>5} {imports:>8.1f} {parts['data']:>6.1f} {parts['train']:>7.1f} "
              f"{parts['evaluate']:>9.1f} {parts['logging']:>8.1f} {parts['compare']:>8.1f} {other:>6.1f}")
    print("seconds summed over the study's runs; 'imports' = one process importing the pipeline (paid once per study "
          "with the basic launcher); 'other' = the rest (Hydra, run set-up, MLflow store access, tracing).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
