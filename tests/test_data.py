"""The bundled TFDS builder, class selection and relabelling, and fetch's behaviour offline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pipeline.config import ConfigError, DatasetConfig
from pipeline.data import (DOWNLOAD_HOST, MNIST_MANUAL_FILES, DatasetUnavailable, _host_resolves, builder_for, fetch,
                           load, split_arrays)
from pipeline.datasets.mnist_sample.mnist_sample_dataset_builder import SOURCE, ChecksumError, MnistSample
from pipeline.files import WriteError
from pipeline.formulations import Task


def test_bundled_builder_splits_are_stratified_4000_1000(data_dir):
    builder = builder_for(DatasetConfig(), data_dir)
    assert builder.info.splits["train"].num_examples == 4000
    assert builder.info.splits["test"].num_examples == 1000
    for split, per_class in [("train", 400), ("test", 100)]:
        _, labels = split_arrays(builder, split)
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_train_and_test_hold_different_digits(data_dir):
    builder = builder_for(DatasetConfig(), data_dir)
    train = split_arrays(builder, "train")[0].reshape(4000, -1)
    test = split_arrays(builder, "test")[0].reshape(1000, -1)
    with np.load(SOURCE) as archive:
        assert len({row.tobytes() for row in train} | {row.tobytes() for row in test}) == len(
            {im.tobytes() for im in archive["images"]}
        )


def test_a_prepared_dataset_is_read_without_writing_to_its_folder(data_dir):
    """A shared, read-only data_dir with the dataset prepared will do: fetching it writes nothing, not
    even the preparers' lock file."""
    (Path(data_dir) / ".mnist_sample.lock").unlink(missing_ok=True)
    before = {f: f.stat().st_mtime_ns for f in Path(data_dir).rglob("*")}
    fetch(DatasetConfig(), data_dir)
    assert {f: f.stat().st_mtime_ns for f in Path(data_dir).rglob("*")} == before


def test_a_read_only_prepared_data_dir_serves_a_run(data_dir, tmp_path):
    """A shared copy mounted read-only: the config takes it, and the data are fetched and read from it."""
    (Path(data_dir) / ".mnist_sample.lock").unlink(missing_ok=True)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", data_dir, str(read_only)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount a folder read-only here")
    try:
        from pipeline.config import Config

        assert Config(data_dir=str(read_only)).data_dir == str(read_only)
        fetch(DatasetConfig(), str(read_only))
        assert len(load(DatasetConfig(), str(read_only)).x_train) == 3600
    finally:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


def test_a_data_dir_that_cannot_be_written_is_one_line_naming_where(tmp_path):
    # /proc refuses new folders even to root, whom permission bits would not stop.
    with pytest.raises(WriteError, match=r"^could not create the lock file /proc/1/fromlogits-tfds/.mnist_sample.lock: "):
        fetch(DatasetConfig(), "/proc/1/fromlogits-tfds")


def test_damaged_bundled_file_is_a_clear_error(tmp_path):
    damaged = tmp_path / "mnist_5k.npz"
    shutil.copy(SOURCE, damaged)
    with open(damaged, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")

    class DamagedMnistSample(MnistSample):
        __module__ = MnistSample.__module__  # TFDS reads a builder's metadata from its module's package
        source = damaged

    with pytest.raises(ChecksumError, match="sha256 .* expected 246e0c30"):
        DamagedMnistSample(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    assert not (tmp_path / "tfds" / "damaged_mnist_sample" / "1.0.0").exists()  # nothing half-written


def test_validation_split_is_stratified_and_fixed(data_dir):
    a, b = load(DatasetConfig(validation_fraction=0.1), data_dir), load(DatasetConfig(validation_fraction=0.1), data_dir)
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (3600, 400, 1000)
    assert np.bincount(a.y_val).tolist() == [40] * 10
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert a.x_train.dtype == np.float32 and a.x_train.max() == 1.0 and a.num_inputs == 784


def test_raw_pixels_are_not_scaled(data_dir):
    assert load(DatasetConfig(pixel_scale="none"), data_dir).x_train.max() == 255.0


def test_binary_task_relabels_the_two_classes_in_order(data_dir):
    full = load(DatasetConfig(validation_fraction=0.0), data_dir)
    binary = load(DatasetConfig(task=Task.binary, classes=[8, 3], validation_fraction=0.0), data_dir)
    assert binary.num_classes == 2 and binary.class_ids == [8, 3]
    assert sorted(np.unique(binary.y_train).tolist()) == [0, 1] and len(binary.y_train) == 800
    eights = full.x_train[full.y_train == 8]
    np.testing.assert_array_equal(binary.x_train[binary.y_train == 0], eights)
    assert len(binary.x_test) == 200


def test_class_absent_from_the_dataset_is_rejected(data_dir):
    with pytest.raises(ConfigError, match=r"class\(es\) \[12\] are absent"):
        load(DatasetConfig(task=Task.binary, classes=[0, 12]), data_dir)


def test_unknown_dataset_is_rejected_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="dataset.name='no_such_digits' is not accepted"):
        fetch(DatasetConfig(name="no_such_digits"), str(tmp_path))


@pytest.mark.skipif(_host_resolves(DOWNLOAD_HOST), reason="this machine has network: the offline path cannot be shown")
def test_full_mnist_offline_fails_fast_saying_how_to_proceed(tmp_path):
    with pytest.raises(DatasetUnavailable) as error:
        fetch(DatasetConfig(name="mnist"), str(tmp_path))
    message = str(error.value)
    assert all(name in message for name in MNIST_MANUAL_FILES) and "dataset=mnist_sample" in message


def test_downloads_can_be_disabled(tmp_path):
    with pytest.raises(DatasetUnavailable, match="downloads disabled"):
        fetch(DatasetConfig(name="fashion_mnist"), str(tmp_path), allow_download=False)


def test_full_mnist_goes_through_the_same_loading_code(tmp_path):
    """TFDS's real `mnist` builder, with its download mocked (the only thing that cannot happen here)."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in MNIST_MANUAL_FILES:  # their presence lets fetch go on to (mocked) preparation
        (manual / name).touch()
    with tfds.testing.mock_data(num_examples=60):
        fetch(DatasetConfig(name="mnist"), str(tmp_path))
        splits = load(DatasetConfig(name="mnist", validation_fraction=0.0), str(tmp_path))
    assert splits.x_train.shape == (60, 784) and splits.num_classes == 10
    assert 0.0 <= splits.x_train.min() and splits.x_train.max() <= 1.0


def test_a_damaged_prepared_file_is_named_even_after_a_good_read(tmp_path):
    """Reads are decoded once per process; a file changed since is read again, and damage reported in one line."""
    data_dir = str(tmp_path / "tfds")
    fetch(DatasetConfig(), data_dir)
    good = load(DatasetConfig(), data_dir)
    (shard,) = [p for p in Path(data_dir, "mnist_sample").rglob("*train.array_record*")]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DatasetUnavailable, match=f"cannot be read .*delete {tmp_path / 'tfds' / 'mnist_sample'} to rebuild it"):
        load(DatasetConfig(), data_dir)
    assert good.x_train.shape == (3600, 784)


def test_what_a_preparer_killed_outright_left_is_removed_by_the_next_and_nothing_else(tmp_path):
    """A SIGKILL during TFDS's preparation left its `incomplete.XXXXXX_<version>` folder (a partial shard) in
    data_dir for good; the next preparation, under the dataset's lock, removes it."""
    from tensorflow_datasets.core.utils.file_utils import _get_incomplete_dir  # TFDS's own name for it

    version_dir = tmp_path / "mnist_sample" / "1.0.0"
    dead = Path(_get_incomplete_dir(str(version_dir)))
    dead.mkdir(parents=True)
    (dead / "mnist_sample-train.array_record-00000-of-00001").write_bytes(b"partial")
    kept = [tmp_path / "mnist_sample" / "incomplete.notes", tmp_path / "mnist_sample" / "incomplete.ABC123_2.0.0"]
    for folder in kept:
        folder.mkdir()
    fetch(DatasetConfig(), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "mnist_sample").iterdir()) == sorted(["1.0.0", *(f.name for f in kept)])
    assert load(DatasetConfig(), str(tmp_path)).x_train.shape == (3600, 784)


def test_junk_in_the_manual_folder_is_one_line_naming_it(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in MNIST_MANUAL_FILES:
        (manual / name).write_text("not a gzip file")
    with pytest.raises(DatasetUnavailable, match=f"cannot prepare mnist from the files in {manual}"):
        fetch(DatasetConfig(name="mnist"), str(tmp_path), allow_download=False)


def test_a_study_reads_from_the_files_whether_its_dataset_is_prepared(tmp_path):
    """The launching process skips TFDS (and TensorFlow's import) only for a complete preparation."""
    from pipeline.study import looks_prepared

    assert not looks_prepared("mnist_sample", None, str(tmp_path))
    incomplete = tmp_path / "mnist_sample" / "1.0.0.incomplete7Q2C"  # what TFDS leaves after a crash
    incomplete.mkdir(parents=True)
    (incomplete / "dataset_info.json").write_text("{}")
    assert not looks_prepared("mnist_sample", None, str(tmp_path))
    complete = tmp_path / "mnist_sample" / "1.0.0"
    complete.mkdir()
    (complete / "dataset_info.json").write_text("{}")
    assert looks_prepared("mnist_sample", None, str(tmp_path)) and looks_prepared("mnist_sample", "1.0.0", str(tmp_path))
    assert not looks_prepared("mnist_sample", "2.0.0", str(tmp_path))


def test_a_decoded_split_is_kept_for_the_next_process_until_the_data_are_prepared_again(data_dir, tmp_path, monkeypatch):
    """Decoding example by example costs every process seconds; the next one reads the decoded copy, and
    a new preparation of the same dataset is decoded again, its old copy removed."""
    from pipeline import data

    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(".decoded"))
    builder = builder_for(DatasetConfig(), str(copy))
    decoded = split_arrays(builder, "train")
    kept = list((copy / ".decoded").iterdir())
    assert [p.name.startswith("mnist_sample-1.0.0-train-") for p in kept] == [True]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_DECODED", {})  # as in a new process
    monkeypatch.setattr(type(builder), "as_data_source", no_decoding)
    again = split_arrays(builder, "train")
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(decoded, again))

    monkeypatch.undo()
    monkeypatch.setattr(data, "_DECODED", {})
    (kept[0]).write_bytes(b"damaged")  # damaged: decoded again, and rewritten
    assert all(np.array_equal(a, b) for a, b in zip(decoded, split_arrays(builder, "train")))
    assert data._read_decoded(kept[0]) is not None

    prepared = next(Path(builder.data_dir).glob("*.json"))
    prepared.touch()  # what a new preparation does to the prepared files' state
    monkeypatch.setattr(data, "_DECODED", {})
    split_arrays(builder, "train")
    now = list((copy / ".decoded").iterdir())
    assert len(now) == 1 and now != kept
