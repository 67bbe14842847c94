"""fromlogits: does it matter whether a classifier's loss reads probabilities or logits?

Sets process-wide defaults before TensorFlow is first imported (every pipeline module comes here first).
"""

import atexit
import contextlib
import gc
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

# Registered first, so it runs after every other exit handler: the interpreter's final garbage collection
# walks TensorFlow's, Keras's and MLflow's object graphs, 2 s per process (measured; a study waits for its
# workers' exits too), and frozen objects are left to the operating system. Nothing the pipeline writes
# waits for that collection: files are written and closed with context managers (pipeline/files.py).
atexit.register(gc.freeze)

# An explicit value in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO lines drown the pipeline's output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One inter-op and one intra-op thread: the training loop is a chain of small ops, which threads only slow
# down (on 2 cores a probs_naive epoch took 0.43 s with one of each, 0.70 s with TensorFlow's defaults:
# benchmarks/train_throughput.py, README Speed), and a study runs one process per core anyway. Under TensorFlow's
# op-determinism mode (pipeline/train.py) every metric is bit-identical whatever the thread counts.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

# TensorFlow 2.21 logs these while it loads, before absl's logging is initialised, so TF_CPP_MIN_LOG_LEVEL
# cannot hold them back (abseil-cpp#1718): notices, not errors, printed twice per process.
_IMPORT_NOTICES = re.compile(r"All log messages before absl::InitializeLog\(\)|\] oneDNN custom operations are on"
                             r"|cpu_feature_guard\.cc|^To enable the following instructions|appropriate compiler flags")


@contextlib.contextmanager
def _stderr_without_import_notices():
    """Holds back the file descriptor 2 output of the block, then passes on every line but the notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _IMPORT_NOTICES.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the process's `import tensorflow`, wherever it happens, inside that filter."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # where Python would find it
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(self)  # loaded once: later look-ups need no filter
                with _stderr_without_import_notices():
                    load(module)

            spec.loader.exec_module = exec_module
        return spec


if "tensorflow" not in sys.modules and os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":
    sys.meta_path.insert(0, _QuietTensorFlowImport())


# Optional packages that TensorFlow and Keras import while they load, for features the pipeline never uses
# (importing module: package). Each is imported inside `try: ... except ImportError` there, so holding it back
# only turns that feature off. `import pipeline.stages` took 8.4-8.5 s with them held back against 11.1-13.0 s
# (alternating; python -X importtime: SciPy's statistics came with scikit-learn), in every process that trains.
# The same packages load as usual for any other importer (the reports' matplotlib, a JAX backend's jax).
_UNUSED_OPTIONAL_IMPORTS = {
    "tensorflow.lite.python.util": "jax",  # TFLite's converter from JAX functions
    "keras.src.callbacks.orbax_checkpoint": "jax",  # a patch of JAX's monitoring for Orbax checkpoints
    "keras.src.wrappers.fixes": "sklearn",  # Keras's scikit-learn estimators
    "keras.src.wrappers.sklearn_wrapper": "sklearn",
    "keras.src.wrappers.utils": "sklearn",
    "keras.src.visualization.plot_image_gallery": "matplotlib",  # Keras's image galleries
    "keras.src.visualization.plot_bounding_box_gallery": "matplotlib",
}
_HELD_BACK_PACKAGES = frozenset(_UNUSED_OPTIONAL_IMPORTS.values())  # looked up on every import of a new module


class _UnusedOptionalImports(importlib.abc.MetaPathFinder):
    """Answers `ImportError` to the imports of `_UNUSED_OPTIONAL_IMPORTS`, and only to those importers."""

    def find_spec(self, name, path, target=None):
        package = name.partition(".")[0]
        if package not in _HELD_BACK_PACKAGES:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
            frame = frame.f_back  # the import machinery's own frames, up to the module running the import
        importer = frame.f_globals.get("__name__") if frame is not None else None
        if _UNUSED_OPTIONAL_IMPORTS.get(importer) == package:
            raise ModuleNotFoundError(f"{package} is not imported for {importer} (pipeline/__init__.py)", name=name)
        return None


sys.meta_path.insert(0, _UnusedOptionalImports())
