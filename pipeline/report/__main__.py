"""`python -m pipeline.report --study NAME | --parent-run-id ID`: rebuild a study's report from MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import OneLineParser
from pipeline.config import PipelineError, check_name, check_store_uri, require_folder


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import DEFAULT_EXPERIMENT, Config
    from pipeline.report import build_report, print_report
    from pipeline.tracking import prepare_store, tracking_uri
    from pipeline.tracking.store import sqlite_database

    parser = OneLineParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    parser.add_argument("--study", help="study name (its latest finished parent run)")
    parser.add_argument("--parent-run-id", help="report on this parent run instead")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default=None, help="report folder (default <reports_dir>/<study>)")
    args = parser.parse_args(argv)
    if args.study is None and args.parent_run_id is None:
        parser.error("give --study NAME or --parent-run-id ID")
    try:
        check_name("--experiment", args.experiment)
        out = None if args.out is None else Path(args.out)  # as typed: Path("") would be the working directory
        if out is not None:  # before anything is read: the report is written last
            require_folder("--out", args.out, out.absolute(), writable=True)
        if args.tracking_uri is not None:
            check_store_uri("--tracking-uri", args.tracking_uri, unset="leave it out")
        uri = tracking_uri(args.tracking_uri)
        database = sqlite_database(uri)
        if database is None or database.exists():
            prepare_store(uri, args.experiment)
        else:  # reading must never create an empty store where the user mistyped a path
            print(f"error: there is no MLflow store at {database}", file=sys.stderr)
            return 2
        report = build_report(uri, Path(Config().reports_dir), args.experiment, args.study, args.parent_run_id, out)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_command

    run_command(main, "the report folder is whole or as it was (never half-written); the same command builds it")
