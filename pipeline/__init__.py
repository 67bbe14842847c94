"""fromlogits: does it matter whether a classifier's loss reads probabilities or logits?"""

import os

# Process-wide defaults, set before TensorFlow is first imported (any pipeline module comes here first).
# An explicit value in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO lines drown the pipeline's output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One inter-op thread: the training loop is a chain of small ops; on 2 cores this measured 20% faster
# per epoch (benchmarks/train_throughput.py), while model.fit was unaffected.
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
