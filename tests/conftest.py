"""Shared pytest set-up: CPU only, float32, quiet TFDS/absl logging, and one persistent
XLA compilation cache for the whole suite.

Many tests compile the same small programs (the tiny config's training step, a conv4
``init``, PA's episode loop), in this process, in other pytest workers and in the
subprocesses the end-to-end tests start (they inherit these variables; ``main.py``'s
``--compilation_cache=`` leaves them alone). A cache hit loads the compiled executable
instead of compiling again; its key is the program, the jax version and the flags, so a
hit never changes a result. The cache lives in ``.pytest_cache/jax`` (git-ignored; a fresh
clone starts empty) or in ``$FLATFSC_TEST_JAX_CACHE``.
"""

import collections
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.environ.get("FLATFSC_TEST_JAX_CACHE", os.path.join(_ROOT, ".pytest_cache", "jax")),
)
# Cache every compilation, however quick: the suite's are small and repeated.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    """Files with the most ``slow`` tests first (stable otherwise): ``--dist loadfile`` hands
    files to the two workers in this order, and a long file started last would run alone at
    the end while the other worker idles."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
