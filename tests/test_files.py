"""Outputs are written whole, readable by colleagues, and never over a folder the pipeline did not make."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from pipeline.files import MARKER, WriteError, staged_folder, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask_not_the_private_temporary_modes(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        with staged_folder(tmp_path / "reports" / "study") as staging:
            (staging / "report.md").write_text("x")
    finally:
        os.umask(old)
    # Computed from the umask at import (0o022 in CI and here), not from the temporary file's 0600 / folder's 0700.
    from pipeline.files import FILE_MODE, FOLDER_MODE

    assert mode(tmp_path / "metrics.json") == FILE_MODE and FILE_MODE & 0o044 == 0o044
    assert mode(tmp_path / "reports" / "study") == FOLDER_MODE and FOLDER_MODE & 0o055 == 0o055
    assert mode(tmp_path / "reports" / "study" / "report.md") == FILE_MODE


def test_a_folder_the_pipeline_did_not_make_is_never_replaced(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("months of work")
    with pytest.raises(WriteError, match=f"is not a report folder of this pipeline \\(no {MARKER} in it\\)"):
        with staged_folder(precious):
            pytest.fail("nothing may be written")
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]  # no staging folder left behind


def test_a_report_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "reports" / "s"
    with staged_folder(target) as staging:
        (staging / "old.png").write_text("1")
    with staged_folder(target) as staging:
        (staging / "new.png").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new.png"]


WRITER = """
import sys
from pathlib import Path
from pipeline.files import staged_folder
for i in range(150):
    with staged_folder(Path(sys.argv[1])) as staging:
        (staging / "report.md").write_text(f"{sys.argv[2]} {i}")
"""


def test_a_stop_the_moment_the_staging_folder_exists_leaves_nothing_beside_the_report(tmp_path, monkeypatch):
    """A Ctrl-C to `pipeline.report` right after its staging folder was made (while its mode was set) left that
    folder, without the marker that lets a later writer remove it, so it stayed beside the report for good."""
    final = tmp_path / "report"
    with staged_folder(final) as staging:
        (staging / "report.md").write_text("the previous report\n")
    chmod = os.chmod

    def interrupted(path, mode, *args, **kwargs):
        if os.path.basename(path).startswith(".report.partial-"):
            raise KeyboardInterrupt
        return chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final) as staging:
            (staging / "report.md").write_text("a new report\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert (final / "report.md").read_text() == "the previous report\n"


def test_a_stop_as_the_staging_folder_is_made_leaves_nothing_beside_the_report(tmp_path, monkeypatch):
    """The same a moment earlier, as the folder is made: its name was known only once tempfile.mkdtemp returned,
    so a Ctrl-C landing between the mkdir and that return left it (1 in 30 of the report CLI's Ctrl-C test
    under load)."""
    final = tmp_path / "report"
    mkdir = os.mkdir

    def interrupted(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if os.path.basename(path).startswith(".report.partial-"):
            raise KeyboardInterrupt  # the signal, right after the folder exists

    monkeypatch.setattr(os, "mkdir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(final) as staging:
            (staging / "report.md").write_text("a report\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_stop_as_a_files_temporary_sibling_is_made_leaves_only_its_previous_version(tmp_path, monkeypatch):
    """The same for a single file (metrics.json, a checkpoint): tempfile.mkstemp named its file only on return."""
    path = tmp_path / "metrics.json"
    write_json(path, {"epoch": 1})
    opened = os.open

    def interrupted(name, flags, *args, **kwargs):
        fd = opened(name, flags, *args, **kwargs)
        if os.path.basename(name).startswith(".metrics.json."):
            os.close(fd)
            raise KeyboardInterrupt  # the signal, right after the file exists
        return fd

    monkeypatch.setattr(os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert path.read_text() == '{\n  "epoch": 1\n}'


def test_writers_of_one_report_folder_at_once_take_turns(tmp_path):
    """Two identical studies that end together write the same report folder: each replaces it whole, and
    neither mistakes the other's folder, caught mid-swap, for one the pipeline did not make."""
    final = tmp_path / "reports" / "study"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(final), name], stderr=subprocess.PIPE, text=True)
               for name in ("a", "b")]
    errors = [writer.communicate(timeout=120)[1] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], [e[-500:] for e in errors]
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "report.md"]
    assert (final / "report.md").read_text() in ("a 149", "b 149")
    assert [p.name for p in final.parent.iterdir()] == ["study"]  # no staging or previous folder left


def test_what_a_killed_report_writer_left_is_removed_by_the_next_and_nothing_else(tmp_path):
    from pipeline.processes import process_tags

    me = process_tags()
    final = tmp_path / "reports" / "study"
    final.parent.mkdir()

    def left(name: str, ours: bool = True):
        folder = final.parent / name
        folder.mkdir()
        if ours:
            (folder / MARKER).write_text("")
        return folder

    killed = left(f".study.partial-{me['pid']}-1.000-abc123")  # this pid, another start time: a writer that died
    swapping = left(f".study.previous-{me['pid']}-1.000")
    alive = left(f".study.partial-{me['pid']}-{me['pid_started']}-def456")  # a writer still at work
    foreign = left(f".study.partial-{me['pid']}-1.000-xyz789", ours=False)
    other_study = left(f".study2.partial-{me['pid']}-1.000-abc123")
    with staged_folder(final) as staging:
        (staging / "report.md").write_text("new")
    assert not killed.exists() and not swapping.exists()
    assert alive.exists() and foreign.exists() and other_study.exists()
    assert (final / "report.md").read_text() == "new"

