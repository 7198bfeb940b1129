"""Shared pytest set-up: CPU only, float32, quiet TFDS/absl logging."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
