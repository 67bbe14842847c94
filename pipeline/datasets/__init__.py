"""Project-local TensorFlow Datasets builders. Importing this package registers them with TFDS."""

from pipeline.datasets.mnist_sample.mnist_sample_dataset_builder import MnistSample  # noqa: F401
