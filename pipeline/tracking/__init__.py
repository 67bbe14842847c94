"""MLflow, the pipeline's one home for it: the store (`store.py`) and the life of runs (`runs.py`).

Every MLflow query of the pipeline lives in this package, apart from pipeline/report/runs.py, which
reads a study back for its report.
"""

from pipeline.tracking.runs import (MetricBuffer, RunDeleted, Study, discard_unfinished_models, end_status,
                                    has_finished_model, last_logged_steps, logged_models, out_of_space,
                                    record_failed_job, tracked_run, unlogged)
from pipeline.tracking.store import (TrackingUnavailable, end_orphaned_children, is_server, mark_stale_runs,
                                     prepare_store, resumable, tracking_uri)

__all__ = ["MetricBuffer", "RunDeleted", "Study", "TrackingUnavailable", "discard_unfinished_models",
           "end_orphaned_children", "end_status", "has_finished_model", "is_server", "last_logged_steps",
           "logged_models", "mark_stale_runs", "out_of_space", "prepare_store", "record_failed_job", "resumable",
           "tracked_run", "tracking_uri", "unlogged"]
