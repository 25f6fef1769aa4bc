"""transferlab: a reproducible DVC + MLflow pipeline for transfer learning on images."""
import os

# TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU features) drown the stages' own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
