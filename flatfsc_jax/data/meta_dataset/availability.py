"""Which Meta-Dataset sources are prepared in a data directory, and how to prepare the rest.

Reads directory listings and ``dataset_info.json`` only (no image): the fail-fast check
of a run (``require_sources``), ``prepare --list`` (``source_status``) and the prepare
command that every "missing" or "corrupted" error names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.meta_dataset.specs import (
    BUILDER_NAME,
    PREPARE_MODULE,
    SOURCES,
    SPLITS,
    TF_INSTALL_HINT,
    check_source,
    load_class_splits,
    no_catalogue_message,
)
from flatfsc_jax.data.sources import MissingDataError


def missing_sources(sources_: Iterable[str], data_dir) -> list[str]:
    """The sources (names, in the given order) not prepared in ``data_dir``."""
    names = list(dict.fromkeys(check_source(s) for s in sources_))
    return [s for s in names if sources.prepared_dir(data_dir, BUILDER_NAME, s) is None]


def prepare_command(names: Sequence[str], data_dir) -> str:
    command = f"{PREPARE_MODULE} --sources={','.join(names)} --data_dir={data_dir}"
    if any(SOURCES[s].catalogue and SOURCES[s].catalogue.manual_download for s in names):
        command += " --manual_dir=<dir with the manual downloads>"
    local = [s for s in names if SOURCES[s].catalogue is None]
    if local:
        command += " --source_dirs=" + ",".join(f"{s}=<{s} dir>" for s in local)
    return command


def missing_message(names: Sequence[str], data_dir) -> str:
    lines = [
        f"Meta-Dataset sources not prepared in data_dir={str(data_dir)!r}: {', '.join(names)}.",
        f"Prepare them with (TensorFlow needed for catalogue sources: {TF_INSTALL_HINT}):",
        f"  {prepare_command(names, data_dir)}",
    ]
    for s in names:
        cat = SOURCES[s].catalogue
        if cat is None:
            lines.append(f"  {s}: {no_catalogue_message(s)}")
        elif cat.manual_download:
            lines.append(f"  {s}: {cat.manual_download}")
    return "\n".join(lines)


def require_sources(sources_: Iterable[str], data_dir) -> None:
    """Raises ``MissingDataError`` naming every missing source and the prepare command."""
    missing = missing_sources(sources_, data_dir)
    if missing:
        raise MissingDataError(missing_message(missing, data_dir))


def source_status(source: str, data_dir) -> dict[str, Any]:
    """Whether ``source`` is prepared and its classes / images per split (no data read)."""
    source = check_source(source)
    class_splits = load_class_splits(source)
    path = sources.prepared_dir(data_dir, BUILDER_NAME, source)
    status: dict[str, Any] = {
        "source": source,
        "seen": SOURCES[source].seen,
        "prepared": False,
        "path": None if path is None else str(path),
        "splits": {s: {"classes": class_splits.num_classes(s), "images": None} for s in SPLITS},
    }
    if path is None:
        return status
    try:
        info = tfds.builder_from_directory(str(path)).info
    except Exception as e:
        status["error"] = f"{type(e).__name__}: {e}"
        return status
    status["prepared"] = True
    for s in class_splits.splits_with_classes():
        if s in info.splits:
            status["splits"][s]["images"] = info.splits[s].num_examples
    return status
