"""Which Meta-Dataset sources are prepared in a data directory, and how to prepare the rest.

Reads directory listings and ``dataset_info.json`` only (no image): the fail-fast check
of a run (``require_sources``), ``prepare --list`` (``source_status``) and the prepare
command that every "missing" or "corrupted" error names.

Our sources live in ``<data_dir>/flatfsc_meta_dataset/``. ``<data_dir>/meta_dataset/`` is
either Meta-Dataset's own TFDS build (md_tfds: one ``all_classes`` split of JPEGs), which
we never change or ask anyone to delete (``prepare --from_md_tfds`` reads it), or what
flatfsc_jax wrote before it had a name of its own, which one ``mv`` makes readable again
(same files, same format).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow_datasets as tfds

from flatfsc_jax.data import sources
from flatfsc_jax.data.meta_dataset.specs import (
    BUILDER_NAME,
    LEGACY_BUILDER_NAME,
    PREPARE_MODULE,
    SOURCES,
    SPLITS,
    TF_INSTALL_HINT,
    ClassSplits,
    check_source,
    load_class_splits,
    no_catalogue_message,
)
from flatfsc_jax.data.sources import MissingDataError


def missing_sources(sources_: Iterable[str], data_dir) -> list[str]:
    """The sources (names, in the given order) not prepared in ``data_dir``."""
    names = list(dict.fromkeys(check_source(s) for s in sources_))
    return [s for s in names if sources.prepared_dir(data_dir, BUILDER_NAME, s) is None]


def other_build(source: str, data_dir) -> str | None:
    """What ``<data_dir>/meta_dataset/<source>`` is, if it exists, and what to run; else None.

    flatfsc_jax's builder was once named ``meta_dataset``, the name Meta-Dataset's own
    TFDS build uses: the builder module recorded in ``dataset_info.json`` tells them apart.
    """
    root = os.path.join(os.fspath(data_dir), LEGACY_BUILDER_NAME, source)
    infos = sorted(glob.glob(os.path.join(root, "*", "dataset_info.json")))
    if not infos:
        return None
    try:
        with open(infos[-1], encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    module = str(info.get("moduleName", "")) if isinstance(info, dict) else ""
    new = os.path.join(os.fspath(data_dir), BUILDER_NAME, source)
    if module.startswith("flatfsc_jax"):
        return (
            f"{root} was prepared by an earlier flatfsc_jax under the old builder name; "
            f"move it to make it readable: mkdir -p {os.path.dirname(new)} && mv {root} {new}"
        )
    return (
        f"{root} is not ours: it is Meta-Dataset's own TFDS build (md_tfds, one 'all_classes' "
        f"split) or another tool's, and is left untouched. Prepare {source} beside it from "
        f"that build: {PREPARE_MODULE} --from_md_tfds={data_dir} --sources={source} "
        f"--data_dir={data_dir}  (or from Meta-Dataset's records: "
        + records_command([source], data_dir)
        + ")"
    )


def records_command(names: Sequence[str], data_dir) -> str:
    sources_ = ",".join(names)
    return f"{PREPARE_MODULE} --from_records=$RECORDS --sources={sources_} --data_dir={data_dir}"


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
        "From Meta-Dataset's converted records ($RECORDS/<source>/dataset_spec.json and "
        "<class_id>.tfrecords; no TensorFlow needed):",
        f"  {records_command(names, data_dir)}",
        f"or from the TFDS catalogue (TensorFlow needed: {TF_INSTALL_HINT}):",
        f"  {prepare_command(names, data_dir)}",
    ]
    for s in names:
        note = other_build(s, data_dir)
        if note:
            lines.append(f"  {s}: {note}")
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
        note = other_build(source, data_dir)
        if note:
            status["other_build"] = note
        return status
    try:
        info = tfds.builder_from_directory(str(path)).info
    except Exception as e:
        status["error"] = f"{type(e).__name__}: {e}"
        return status
    status["prepared"] = True
    stored = (info.metadata or {}).get("class_names", {})
    for s in SPLITS:
        if s in stored:  # what was prepared (a subset, for a miniature)
            status["splits"][s]["classes"] = len(stored[s])
        if s in info.splits:
            status["splits"][s]["images"] = info.splits[s].num_examples
    return status


def prepared_class_splits(source: str, data_dir) -> ClassSplits:
    """The class split a prepared source holds, from its ``metadata.json`` (no image read).

    For data prepared from records of a subset of the classes (the miniature
    Meta-Dataset, a partial copy): pass it as ``class_splits`` to ``benchmarks.load_split``
    instead of the shipped splits, which such data does not match.
    """
    source = check_source(source)
    path = sources.prepared_dir(data_dir, BUILDER_NAME, source)
    if path is None:
        raise MissingDataError(missing_message([source], data_dir))
    with open(os.path.join(os.fspath(path), "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    classes = {s: tuple(meta.get("class_names", {}).get(s, ())) for s in SPLITS}
    groups = None
    if "class_groups" in meta:
        names = meta["group_names"]
        groups = {s: tuple(names[g] for g in meta["class_groups"].get(s, ())) for s in SPLITS}
    return ClassSplits(source=source, classes=classes, groups=groups)
