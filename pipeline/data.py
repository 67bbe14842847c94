"""fetch: TFDS `download_and_prepare`; load: prepared splits as in-memory arrays.

Every dataset, bundled or not, goes through a TFDS builder. A second fetch finds the prepared data in
`data_dir` and does no work. Datasets that are not prepared and cannot be downloaded fail at once with
what to do offline, instead of TFDS's minutes of retries.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

import pipeline.datasets  # noqa: F401  (registers the bundled builders)
from pipeline.config import PIXEL_SCALES, ConfigError, DatasetConfig, PipelineError, error_summary
from pipeline.datasets.mnist_sample.mnist_sample_dataset_builder import SOURCE_SHA256
from pipeline.files import exclusive
from pipeline.config import Task
from pipeline.record import DatasetRef

tfds.disable_progress_bar()


class _NoOpenCvAdvice(logging.Filter):
    """TFDS advises installing OpenCV once per process when it decodes images with PIL; PIL is fine here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoOpenCvAdvice())

BUNDLED = {"mnist_sample": SOURCE_SHA256}
# TFDS's own mirror, tried first for most datasets; if its name does not resolve there is no network.
DOWNLOAD_HOST = "storage.googleapis.com"
MNIST_MANUAL_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# ArrayRecord files are read by random access without a tf.data pipeline (which logs a spurious C++
# error with TFDS 4.9.10 + TF 2.21, and costs a graph per load).
FILE_FORMAT = "array_record"
VALIDATION_SEED = 7  # the validation carve-out is the same in every run of a dataset


class DatasetUnavailable(PipelineError):
    """The dataset is neither prepared nor obtainable from here."""


def builder_for(dataset: DatasetConfig, data_dir: str) -> tfds.core.DatasetBuilder:
    spec = dataset.name if dataset.version is None else f"{dataset.name}:{dataset.version}"
    try:
        builder = tfds.builder(spec, data_dir=data_dir, file_format=FILE_FORMAT)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"dataset.name={dataset.name!r} is not accepted: expected a TFDS dataset name "
            f"(bundled: {', '.join(BUNDLED)}; others: mnist, fashion_mnist, ... see tfds.list_builders())"
        ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ConfigError(
            f"dataset.name={dataset.name!r} is not accepted: expected an image-classification dataset "
            f"with 'image' and 'label' features (it has {', '.join(features.keys())})"
        )
    return builder


def _host_resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def manual_dir(data_dir: str) -> Path:
    return Path(data_dir) / "downloads" / "manual"


def fetch(dataset: DatasetConfig, data_dir: str, allow_download: bool = True) -> DatasetRef:
    """Prepares the dataset in `data_dir` (no work when it is prepared already)."""
    builder = builder_for(dataset, data_dir)
    if builder.is_prepared():  # reading takes no lock: a prepared, read-only data_dir will do
        return DatasetRef(dataset.name, str(builder.version), data_dir, BUNDLED.get(dataset.name))
    manual = manual_dir(data_dir)
    if dataset.name not in BUNDLED:
        has_manual_files = dataset.name == "mnist" and all((manual / f).exists() for f in MNIST_MANUAL_FILES)
        if not has_manual_files and not (allow_download and _host_resolves(DOWNLOAD_HOST)):
            offline_hint = (
                f"put {', '.join(MNIST_MANUAL_FILES)} in {manual}" if dataset.name == "mnist"
                else f"prepare it in {data_dir} on a machine with network and copy it here"
            )
            raise DatasetUnavailable(
                f"dataset {dataset.name!r} is not prepared in {data_dir} and cannot be downloaded "
                f"({'downloads disabled' if not allow_download else DOWNLOAD_HOST + ' does not resolve'}). "
                f"Offline: {offline_hint}, or use dataset=mnist_sample (bundled)."
            )
    # One preparer at a time: the jobs of a study prepare a dataset the study found prepared in another
    # version only (pipeline/study.py); TFDS's own preparation fails when two processes race.
    with exclusive(Path(data_dir) / f".{dataset.name}.lock", wait=True):
        remove_dead_preparations(Path(builder.data_dir))
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
        except PipelineError:
            raise  # the bundled builder's own errors (a damaged source file) say what to do
        except Exception as error:  # noqa: BLE001 - junk or partial source files, a full disk: one line
            if dataset.name in BUNDLED:  # TFDS prepares into a temporary folder and removes it on failure
                raise DatasetUnavailable(
                    f"cannot prepare {dataset.name} in {data_dir} ({error_summary(error, 200)}); nothing of it was "
                    "kept: fix that (e.g. free space there) or set data_dir= to another folder") from None
            manual_files = dataset.name == "mnist" and manual.is_dir()
            advice = (f"replace them with MNIST's original {', '.join(MNIST_MANUAL_FILES)}" if manual_files
                      else f"delete {Path(data_dir) / dataset.name} and fetch again")
            raise DatasetUnavailable(
                f"cannot prepare {dataset.name} from {f'the files in {manual}' if manual_files else 'its download'} "
                f"({error_summary(error, 200)}); "
                f"{advice}") from None
    return DatasetRef(dataset.name, str(builder.version), data_dir, BUNDLED.get(dataset.name))


def remove_dead_preparations(version_dir: Path) -> None:
    """TFDS prepares a version into `incomplete.<6 capitals or digits>_<version>` beside it and renames that
    folder when done; a preparer killed outright (SIGKILL, the OOM killer, power loss) leaves it there for good.
    Called under the dataset's lock, when no preparer is alive: removes those folders of this version, nothing else."""
    leftover = re.compile(rf"incomplete\.[A-Z0-9]{{6}}_{re.escape(version_dir.name)}")
    for folder in version_dir.parent.glob("incomplete.*"):
        if leftover.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


@dataclass
class Splits:
    """Flattened float32 inputs and int labels (0..k-1 after class selection)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_ids: list[int]  # original label of each new label

    @property
    def num_inputs(self) -> int:
        return self.x_train.shape[1]


# A study's runs in one process read the same prepared files: decoded once, kept read-only.
_DECODED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
# Decoding a split example by example (TFDS's data source, PIL for each PNG) costs every new process about
# 0.6 ms an example, 3 s for the bundled digits: a study's workers, and every study, paid it again. The
# decoded arrays are kept beside the prepared data, named after the prepared files' state (and TFDS's
# version), so any change to those files (a new preparation) is a new name and a stale copy is never read.
DECODED_FOLDER = ".decoded"  # in data_dir, outside every dataset's folder (DVC's fetch output among them)


def _decoded_path(builder, prefix: str, stamp: tuple) -> Path:
    import hashlib

    # TFDS's version too: a copy decoded by another TFDS is decoded again rather than trusted.
    digest = hashlib.blake2b(repr((stamp, tfds.__version__)).encode(), digest_size=12).hexdigest()
    return Path(builder.data_dir_root) / DECODED_FOLDER / f"{prefix}{digest}.npz"


def _decoded_prefix(builder, split: str) -> str:
    """The start of the names of one split's decoded copies, whatever the preparation."""
    name = builder.info.full_name.replace("/", "-")  # name[/config]/version
    return f"{name}-{split}-"


def _read_decoded(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            images, labels = saved["images"], saved["labels"]
    except Exception:  # noqa: BLE001 - absent, or damaged by hand: decode again
        return None
    return (images, labels) if len(images) == len(labels) else None


def _keep_decoded(path: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the decoded arrays (atomically) and removes this split's copies of earlier preparations; a
    read-only data_dir or a full disk only means the next process decodes again."""
    from pipeline.files import WriteError, write_arrays

    try:
        write_arrays(path, images=images, labels=labels)
    except WriteError:
        return
    for stale in path.parent.iterdir():
        if stale.name.startswith(prefix) and stale.suffix == ".npz" and stale != path:
            stale.unlink(missing_ok=True)


def split_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split as arrays, read by random access (no tf.data graph: nothing to log, nothing to trace).

    Decoded once per process while the prepared files stay the same (name, size and mtime of each), and
    once in all while the decoded copy in data_dir/.decoded can be written."""
    folder = Path(builder.data_dir)
    stats = {p.name: p.stat() for p in folder.iterdir()} if folder.is_dir() else {}
    stamp = tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats.items()))
    key = (str(folder), split, stamp)
    if key not in _DECODED:
        prefix = _decoded_prefix(builder, split)
        kept = _decoded_path(builder, prefix, stamp)
        arrays = _read_decoded(kept)
        if arrays is None:
            try:
                source = builder.as_data_source(split=split)
                examples = [source[i] for i in range(len(source))]
            except Exception as error:  # noqa: BLE001 - a damaged or foreign-format file: say which folder to rebuild
                raise DatasetUnavailable(
                    f"the prepared {builder.name} in {folder} cannot be read ({error_summary(error, 200)}); "
                    f"delete {folder.parent} to rebuild it") from None
            arrays = np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])
            _keep_decoded(kept, prefix, *arrays)
        for array in arrays:
            array.setflags(write=False)
        _DECODED[key] = arrays
        while len(_DECODED) > 4:  # a study reads one dataset's two splits; an atlas, two datasets'
            del _DECODED[next(iter(_DECODED))]
    return _DECODED[key]


def content_digest(dataset: DatasetConfig, data_dir: str) -> str:
    """sha256 of the prepared splits' pixels and labels: the same whenever the same data is prepared,
    although TFDS's files differ byte for byte from one preparation to the next."""
    import hashlib

    builder = builder_for(dataset, data_dir)
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for array in split_arrays(builder, split):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def select_classes(images, labels, class_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the listed classes and relabels them 0..k-1 in the order listed."""
    keep = np.isin(labels, class_ids)
    relabel = {c: i for i, c in enumerate(class_ids)}
    return images[keep], np.array([relabel[int(c)] for c in labels[keep]], dtype=np.int64)


def validation_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices, stratified by class, the same for every run."""
    rng = np.random.default_rng(VALIDATION_SEED)
    train, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load(dataset: DatasetConfig, data_dir: str) -> Splits:
    builder = builder_for(dataset, data_dir)
    images, labels = split_arrays(builder, "train")
    test_images, test_labels = split_arrays(builder, "test")
    labels, test_labels = labels.astype(np.int64), test_labels.astype(np.int64)

    all_ids = list(range(builder.info.features["label"].num_classes))
    class_ids = list(dataset.classes) if dataset.classes is not None else all_ids
    absent = [c for c in class_ids if c not in set(np.unique(labels).tolist())]
    if absent:
        raise ConfigError(
            f"dataset.classes={class_ids} is not accepted: class(es) {absent} are absent from "
            f"{dataset.name}, whose classes are {all_ids}"
        )
    if dataset.task is Task.binary and len(class_ids) != 2:
        raise ConfigError(f"dataset.classes={class_ids} is not accepted: a binary task needs exactly two classes")
    images, labels = select_classes(images, labels, class_ids)
    test_images, test_labels = select_classes(test_images, test_labels, class_ids)

    scale = np.float32(PIXEL_SCALES[dataset.pixel_scale])

    def flat(x):
        return x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float32) * scale

    train_idx, val_idx = validation_split(labels, dataset.validation_fraction)
    if len(train_idx) == 0:
        raise ConfigError(
            f"dataset.validation_fraction={dataset.validation_fraction} is not accepted: it leaves no training "
            f"examples of the {len(labels)} in {dataset.name}'s train split; expected a smaller fraction")
    return Splits(
        x_train=flat(images[train_idx]), y_train=labels[train_idx],
        x_val=flat(images[val_idx]), y_val=labels[val_idx],
        x_test=flat(test_images), y_test=test_labels,
        num_classes=len(class_ids), class_ids=class_ids,
    )
