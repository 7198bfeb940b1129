"""The backbone zoo: one Orbax checkpoint + metadata per (benchmark, domain, method).

Layout (everything under one root, normally ``<workdir>/zoo``)::

    <root>/<benchmark>/<domain>/<method>/
        best/              Orbax checkpoint of {params, batch_stats} with the best
                           validation accuracy (what every later stage reads)
        train/             Orbax CheckpointManager of the resumable training state
        metrics.jsonl      one JSON object per logged step / validation
        metadata.json      written last: config, rho, steps, best validation accuracy,
                           parameter count, package versions, date, "complete": true

``method`` is ``erm`` or ``sam`` for per-domain backbones and e.g. ``sam+ft`` /
``sam+lora`` for the fusion entries (the general domain's backbone fine-tuned on
``domain``). An entry is *complete* when its metadata says so, its best checkpoint
exists and matches the sha256 recorded in the metadata; anything else is listed with a
warning and skipped, never loaded half-written. ``status`` tells the stages apart:
absent / incomplete (an unfinished run) / damaged (complete metadata but a missing or
altered ``best/``: the train stage retrains it, evaluation names it and the fix).

Reuse rules (``reuse_or_begin``): an entry is reused only when the keys that define it
(``entry_keys``: backbones, fused entries and students each have their own) equal those of
the effective config the run would train it with; a fused entry also records the sha256 of
its source backbone's ``best/`` and is stale once that source is retrained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flatfsc_jax import errors, models
from flatfsc_jax.entry_keys import config_changes, entry_kind

log = logging.getLogger(__name__)

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "flatfsc_jax")


class IncompatibleCheckpointError(errors.FlatfscError, ValueError):
    """A checkpoint does not fit the model it is restored into."""


class ZooError(errors.FlatfscError, ValueError):
    """A zoo entry cannot be used as it is; the message names the entry and the fix."""


class DamagedEntryError(ZooError):
    """A complete entry whose ``best/`` checkpoint is missing, altered or unreadable."""


class EntryLockedError(ZooError):
    """Another process holds the entry's lock (``Zoo.entry_lock``)."""


class StaleEntryError(ZooError):
    """Complete entries trained with other backbone-defining keys than the config says."""


class MissingEntryError(ZooError, FileNotFoundError):
    """A zoo entry a stage needs is absent or unfinished."""


def checksum(path) -> str:
    """sha256 over the relative names and bytes of every file under ``path`` (sorted)."""
    root = os.fspath(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, root).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def describe_model(model_config: dict) -> str:
    return (
        f"{model_config['arch']}(width={model_config['width']}, "
        f"num_classes={model_config['num_classes']})"
    )


def build_model_from_metadata(model_config: dict, *, lora_rank: int = 0) -> models.Model:
    return models.build_model(
        model_config["arch"],
        model_config["num_classes"],
        width=model_config["width"],
        lora_rank=lora_rank,
        dtype=model_config.get("dtype", "float32"),
    )


def save_variables(path, variables: dict) -> None:
    """Writes {params, batch_stats} with Orbax (atomic: a temp dir renamed at the end)."""
    path = epath.Path(path)
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(tree), force=True)
        ckptr.wait_until_finished()


def _shape_tree(tree) -> dict:
    """Flat {'params/a/b': shape} of a pytree (of arrays or Orbax ArrayMetadata)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in flat}


def restore_variables(path, model: models.Model, sample_images, *, stored: str = "?") -> dict:
    """Restores {params, batch_stats} into ``model``'s structure, checked first.

    Raises ``IncompatibleCheckpointError`` naming both architectures when the shapes or
    parameter names differ (e.g. a resnet18 checkpoint restored into a conv4).
    """
    path = epath.Path(path)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_images))
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        have, want = _shape_tree(meta), _shape_tree(target)
        if have != want:
            missing = sorted(set(want) - set(have))[:3]
            extra = sorted(set(have) - set(want))[:3]
            shape = [k for k in set(have) & set(want) if have[k] != want[k]][:3]
            raise IncompatibleCheckpointError(
                f"checkpoint {str(path)!r} holds {stored} but the model is {model.arch} "
                f"(embedding {model.embedding_dim}); missing in checkpoint: {missing}, "
                f"unexpected: {extra}, shape mismatch: "
                f"{[(k, have[k], want[k]) for k in shape]}"
            )
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        return ckptr.restore(path, abstract)


@dataclasses.dataclass
class ZooEntry:
    benchmark: str
    domain: str
    method: str
    path: epath.Path
    metadata: dict

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.domain}/{self.method}"

    @property
    def best_accuracy(self) -> float | None:
        return self.metadata.get("best_validation", {}).get("accuracy")

    @property
    def best_sha256(self) -> str:
        """What identifies the stored backbone (a fusion source, a teacher)."""
        return self.metadata.get("best_sha256") or checksum(self.path / "best")


@dataclasses.dataclass
class LoadedBackbone:
    """What embedding images needs: the model, its variables and the entry's metadata."""

    model: models.Model
    variables: dict
    entry: ZooEntry

    def embed(self, images):
        return self.model.embed(self.variables, images)


def resolve_path(path) -> str:
    """An absolute local path, or a URL (``gs://bucket/x``) unchanged.

    Orbax refuses relative checkpoint paths (e.g. the default "work"), but
    ``os.path.abspath`` would turn ``gs://bucket/x`` into the local folder
    ``<cwd>/gs:/bucket/x``; epath, Orbax and TFDS read the URL itself.
    """
    path = str(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


class Zoo:
    """The zoo at ``root`` (a local folder or a ``gs://`` URL): list, load and write entries."""

    def __init__(self, root):
        self.root = epath.Path(resolve_path(root))

    def entry_dir(self, benchmark: str, domain: str, method: str) -> epath.Path:
        return self.root / benchmark / domain / method

    @contextlib.contextmanager
    def entry_lock(self, benchmark: str, domain: str, method: str):
        """Holds ``<domain>/<method>.lock`` (an exclusive ``flock``) while one process
        checks, trains and completes an entry, so processes filling one zoo concurrently
        (one per GPU: docs/scale.md#one-process-per-gpu) never write the same entry; a
        second process fails at once naming the entry. The lock is a file beside the entry
        folder, so zoo listings skip it. Not taken on cloud storage (no ``flock`` there:
        give processes disjoint ``--entries``) nor by processes > 0 of a multi-host job
        (they train the entry together with process 0, which holds it).
        """
        if "://" in str(self.root) or jax.process_index() > 0:
            yield
            return
        parent = os.fspath(self.entry_dir(benchmark, domain, method).parent)
        os.makedirs(parent, exist_ok=True)
        with open(os.path.join(parent, f"{method}.lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EntryLockedError(
                    f"zoo entry {benchmark}/{domain}/{method} is being written by another "
                    f"process (lock {f.name}); give each process its own --entries=k/n"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def metadata_path(self, benchmark, domain, method) -> epath.Path:
        return self.entry_dir(benchmark, domain, method) / "metadata.json"

    def is_complete(self, benchmark: str, domain: str, method: str) -> bool:
        return self.status(benchmark, domain, method)[0] == "complete"

    def status(self, benchmark: str, domain: str, method: str) -> tuple[str, str | None]:
        """(``absent`` | ``incomplete`` | ``damaged`` | ``complete``, the problem or None)."""
        path = self.entry_dir(benchmark, domain, method)
        if not path.exists():
            return "absent", None
        _, state, problem = self._inspect(path)
        return state, problem

    def _inspect(self, path: epath.Path) -> tuple[ZooEntry | None, str, str | None]:
        """(entry or None, state, problem) of one entry directory."""
        meta_path = path / "metadata.json"
        if not meta_path.exists():
            return None, "incomplete", "no metadata.json (training unfinished or interrupted)"
        try:
            metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, "incomplete", f"unreadable metadata.json ({e})"
        if not isinstance(metadata, dict):
            return (
                None,
                "incomplete",
                f"metadata.json is not a zoo entry (a {type(metadata).__name__})",
            )
        if not metadata.get("complete"):
            return None, "incomplete", "metadata.json is not marked complete"
        lacking = [k for k in ("model", "image_shape") if k not in metadata]
        if lacking or not isinstance(metadata.get("model"), dict):
            return None, "incomplete", f"metadata.json is not a zoo entry (no {lacking or 'model'})"
        if not (path / "best").exists():
            return None, "damaged", "best/ checkpoint is missing"
        recorded = metadata.get("best_sha256")
        # Entries written before checksums were recorded are trusted as they are.
        if recorded is not None and checksum(path / "best") != recorded:
            return None, "damaged", "best/ checkpoint does not match its recorded sha256"
        benchmark, domain, method = path.parts[-3:]
        return ZooEntry(benchmark, domain, method, path, metadata), "complete", None

    def _read_entry(self, path: epath.Path, *, warn: bool) -> ZooEntry | None:
        entry, _, problem = self._inspect(path)
        if problem and warn:
            log.warning("zoo: skipping %s: %s", path, problem)
        return entry

    def damaged_message(self, benchmark, domain, method, problem: str) -> str:
        path = self.entry_dir(benchmark, domain, method)
        return (
            f"zoo entry {benchmark}/{domain}/{method} is damaged ({problem}): delete "
            f"{str(path)!r} and re-run (the train stage then retrains that entry only)"
        )

    def list(self, benchmark: str | None = None) -> list[ZooEntry]:
        """Complete entries, sorted; incomplete or corrupted ones are skipped with a warning."""
        entries = []
        if not self.root.exists():
            return entries
        for meta_dir in sorted(self.root.glob("*/*/*")):
            if not meta_dir.is_dir() or (benchmark and meta_dir.parts[-3] != benchmark):
                continue
            entry = self._read_entry(meta_dir, warn=True)
            if entry is not None:
                entries.append(entry)
        return entries

    def get(self, benchmark: str, domain: str, method: str) -> ZooEntry:
        path = self.entry_dir(benchmark, domain, method)
        entry, state, problem = self._inspect(path) if path.exists() else (None, "absent", None)
        if state == "damaged":
            raise DamagedEntryError(self.damaged_message(benchmark, domain, method, problem))
        if entry is None:
            available = [e.key for e in self.list(benchmark)]
            raise MissingEntryError(
                f"zoo entry {benchmark}/{domain}/{method} is missing or incomplete under "
                f"{str(self.root)!r}; complete entries: {available or 'none'}. "
                + train_hint(benchmark, method)
            )
        return entry

    def load(self, benchmark: str, domain: str, method: str) -> LoadedBackbone:
        entry = self.get(benchmark, domain, method)
        model_config = entry.metadata["model"]
        model = build_model_from_metadata(model_config)
        sample = jnp.zeros((1, *entry.metadata["image_shape"]), jnp.float32)
        try:
            variables = restore_variables(
                entry.path / "best", model, sample, stored=describe_model(model_config)
            )
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # a truncated or altered file Orbax cannot read
            problem = f"best/ cannot be restored: {type(e).__name__}: {str(e)[:200]}"
            raise DamagedEntryError(self.damaged_message(benchmark, domain, method, problem)) from e
        # Training never stores a non-finite state; an older version could (a diverged
        # run finalized as complete): never evaluate one.
        leaves = jax.tree.leaves(variables)
        bad = sum(not np.all(np.isfinite(np.asarray(x))) for x in leaves)
        if bad:
            problem = f"{bad} of its {len(leaves)} arrays are NaN/inf (a diverged run)"
            raise DamagedEntryError(self.damaged_message(benchmark, domain, method, problem))
        return LoadedBackbone(model, variables, entry)

    def write(
        self,
        benchmark: str,
        domain: str,
        method: str,
        *,
        variables: dict,
        model_config: dict,
        image_shape,
        metadata: dict[str, Any],
    ) -> ZooEntry:
        """Saves the best checkpoint and (last) the metadata that marks it complete."""
        path = self.entry_dir(benchmark, domain, method)
        path.mkdir(parents=True, exist_ok=True)
        meta_path = path / "metadata.json"
        if meta_path.exists():  # being overwritten: incomplete until the end
            meta_path.unlink()
        if (path / "best").exists():
            shutil.rmtree(path / "best")
        save_variables(path / "best", variables)
        self.finalize(
            benchmark,
            domain,
            method,
            variables=variables,
            model_config=model_config,
            image_shape=image_shape,
            metadata=metadata,
        )
        return self.get(benchmark, domain, method)

    def finalize(
        self, benchmark, domain, method, *, variables, model_config, image_shape, metadata
    ) -> None:
        """Writes metadata.json (atomically) for an entry whose best/ exists."""
        path = self.entry_dir(benchmark, domain, method)
        full = dict(metadata)
        full.update(
            benchmark=benchmark,
            domain=domain,
            method=method,
            model=dict(model_config),
            image_shape=list(image_shape),
            num_params=models.count_params(variables["params"]),
            num_trunk_params=models.count_params(models.trunk_params(variables["params"])),
            versions=package_versions(),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            complete=True,
        )
        # What the entry is checked against when read (a truncated or altered file).
        full["best_sha256"] = checksum(path / "best")
        tmp = path / "metadata.json.tmp"
        tmp.write_text(json.dumps(full, indent=2, default=_json_default))
        os.replace(tmp, path / "metadata.json")

    def invalidate(self, benchmark, domain, method) -> None:
        """Removes an entry (``--config.retrain``)."""
        path = self.entry_dir(benchmark, domain, method)
        if path.exists():
            shutil.rmtree(path)

    def begin(self, benchmark, domain, method, record: dict, *, discard: bool = False) -> list[str]:
        """Records what a run of an entry trains (``started.json``) before training starts.

        An unfinished run (``train/`` checkpoints, no complete metadata) started with a
        different ``record`` (effective config, fused source) is discarded so that the
        run starts afresh instead of resuming it; returns the changed keys (empty when
        nothing was discarded). ``discard=True`` removes the entry first in any case
        (``--retrain``, a damaged entry). With several processes, process 0 writes and
        all wait for it.
        """
        if entry_kind(method) == "imported":  # never overwrite an import with a run
            raise ZooError(
                f"zoo entry {benchmark}/{domain}/{method} is imported "
                "(python -m flatfsc_jax.cli.import_url), not trained: no stage trains it"
            )
        path = self.entry_dir(benchmark, domain, method)
        started = path / "started.json"
        changes = []
        if started.exists() and not discard:
            try:
                old = json.loads(started.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if not isinstance(old, dict):
                changes = ["started.json: unreadable"]
            else:
                kind = entry_kind(method)
                changes = config_changes(
                    old.get("config", {}),
                    record["config"],
                    fused=kind == "fused",
                    student=kind == "student",
                )
                if old.get("source_sha256") != record.get("source_sha256"):
                    changes.append("fusion source backbone: retrained")
                if old.get("teachers_sha256") != record.get("teachers_sha256"):
                    changes.append("teachers: retrained")
        if jax.process_index() == 0:
            if discard or changes:
                self.invalidate(benchmark, domain, method)
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / "started.json.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=_json_default))
            os.replace(tmp, started)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"zoo.begin {benchmark}/{domain}/{method}")
        return changes

    def reuse_or_begin(
        self,
        benchmark: str,
        domain: str,
        method: str,
        record: dict,
        *,
        retrain: bool,
        stage: str,
        outdated: Callable[[ZooEntry], str | None] | None = None,
    ) -> ZooEntry | None:
        """The reuse policy of every stage that writes entries (train, fuse, distill).

        Returns the complete entry when it is reused. Otherwise records the run that
        will (re)train it (:meth:`begin_run`) and returns None: a damaged entry, one that
        ``outdated(entry)`` explains (its fusion source or teachers were retrained) and,
        with ``retrain``, a complete one are discarded; an unfinished run resumes only
        under the same ``record``.
        """
        key = f"{benchmark}/{domain}/{method}"
        state, problem = self.status(benchmark, domain, method)
        say = print if jax.process_index() == 0 else (lambda *a, **k: None)
        if state == "complete" and not retrain:
            entry = self.get(benchmark, domain, method)
            reason = outdated(entry) if outdated else None
            if reason is None:
                say(f"[{stage}] {key}: complete, reusing it", flush=True)
                return entry
            again = {"fuse": "fusing again"}.get(stage, "training it again")
            say(f"[{stage}] {key}: {reason}; {again}", flush=True)
        if state == "damaged":
            say(f"[{stage}] {key}: damaged ({problem}), retraining it", flush=True)
        self.begin_run(
            benchmark,
            domain,
            method,
            record,
            discard=retrain or state in ("complete", "damaged"),
            stage=stage,
        )
        return None

    def begin_run(
        self, benchmark, domain, method, record: dict, *, discard: bool, stage: str
    ) -> list[str]:
        """:meth:`begin`, saying (process 0, ``[stage]`` prefix) when it discarded an
        unfinished run with other settings; returns the changed keys."""
        changed = self.begin(benchmark, domain, method, record, discard=discard)
        if changed and jax.process_index() == 0:
            print(
                f"[{stage}] {benchmark}/{domain}/{method}: discarded an unfinished run with "
                f"other settings ({'; '.join(changed)}); training it afresh",
                flush=True,
            )
        return changed


def train_hint(benchmark: str, method: str) -> str:
    """How to make a missing entry of ``benchmark``: the command that trains it (students
    need distillation)."""
    kind = entry_kind(method)
    if kind == "imported":
        return (
            "Import it with python -m flatfsc_jax.cli.import_url "
            "(docs/meta-dataset.md#cross-check-against-url)"
        )
    student = kind == "student"
    if benchmark == "glyphs":
        command = "./run.sh --config=configs/glyphs.py" + (":kd" if student else "")
    else:
        command = f"./run.sh --config=configs/{method.split('+')[0]}_resnet18.py" + (
            " --config.fusion.mode=full,distill" if student else ""
        )
    return f"Train it with {command} --stages=train,fuse"


def _json_default(x):
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def format_listing(entries: list[ZooEntry]) -> str:
    """A table of zoo entries for the console."""
    header = f"{'entry':40s} {'arch':22s} {'steps':>8s} {'rho':>6s} {'best val acc':>13s}"
    lines = [header, "-" * len(header)]
    for e in entries:
        m = e.metadata
        acc = e.best_accuracy
        acc_s = f"{100 * acc:6.2f}%" if acc is not None else "-"
        arch = f"{m['model']['arch']} x{m['model']['width']}"
        lines.append(
            f"{e.key:40s} {arch:22s} {m.get('num_steps', 0):8d} "
            f"{m.get('rho', 0.0):6.3g} {acc_s:>13s}"
        )
    if not entries:
        lines.append("(empty)")
    return "\n".join(lines)
