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
``domain``). An entry is *complete* when its metadata says so and its best checkpoint
exists; anything else is listed with a warning and skipped, never loaded half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flatfsc_jax import models

log = logging.getLogger(__name__)

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "flatfsc_jax")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint does not fit the model it is restored into."""


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


@dataclasses.dataclass
class LoadedBackbone:
    """What embedding images needs: the model, its variables and the entry's metadata."""

    model: models.Model
    variables: dict
    entry: ZooEntry

    def embed(self, images):
        return self.model.embed(self.variables, images)


class Zoo:
    """The zoo at ``root``: list, load and write entries."""

    def __init__(self, root):
        # Absolute: Orbax refuses relative checkpoint paths (e.g. the default "work").
        self.root = epath.Path(os.path.abspath(os.path.expanduser(str(root))))

    def entry_dir(self, benchmark: str, domain: str, method: str) -> epath.Path:
        return self.root / benchmark / domain / method

    def metadata_path(self, benchmark, domain, method) -> epath.Path:
        return self.entry_dir(benchmark, domain, method) / "metadata.json"

    def is_complete(self, benchmark: str, domain: str, method: str) -> bool:
        return self._read_entry(self.entry_dir(benchmark, domain, method), warn=False) is not None

    def _read_entry(self, path: epath.Path, *, warn: bool) -> ZooEntry | None:
        meta_path = path / "metadata.json"
        problem = None
        if not meta_path.exists():
            problem = "no metadata.json (training unfinished or interrupted)"
        else:
            try:
                metadata = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"unreadable metadata.json ({e})"
            else:
                if not metadata.get("complete"):
                    problem = "metadata.json is not marked complete"
                elif not (path / "best").exists():
                    problem = "best/ checkpoint is missing"
        if problem:
            if warn:
                log.warning("zoo: skipping %s: %s", path, problem)
            return None
        benchmark, domain, method = path.parts[-3:]
        return ZooEntry(benchmark, domain, method, path, metadata)

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
        entry = self._read_entry(path, warn=False)
        if entry is None:
            available = [e.key for e in self.list(benchmark)]
            raise FileNotFoundError(
                f"zoo entry {benchmark}/{domain}/{method} is missing or incomplete under "
                f"{str(self.root)!r}; complete entries: {available or 'none'}. Train it with "
                f"./run.sh --config=<config>:{domain}"
            )
        return entry

    def load(self, benchmark: str, domain: str, method: str) -> LoadedBackbone:
        entry = self.get(benchmark, domain, method)
        model_config = entry.metadata["model"]
        model = build_model_from_metadata(model_config)
        sample = jnp.zeros((1, *entry.metadata["image_shape"]), jnp.float32)
        variables = restore_variables(
            entry.path / "best", model, sample, stored=describe_model(model_config)
        )
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
        tmp = path / "metadata.json.tmp"
        tmp.write_text(json.dumps(full, indent=2, default=_json_default))
        os.replace(tmp, path / "metadata.json")

    def invalidate(self, benchmark, domain, method) -> None:
        """Removes an entry (``--config.retrain``)."""
        path = self.entry_dir(benchmark, domain, method)
        if path.exists():
            shutil.rmtree(path)


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


def main(argv=None) -> None:
    """``python -m flatfsc_jax.zoo --zoo=DIR``: lists the zoo."""
    import argparse

    parser = argparse.ArgumentParser(description="List the backbone zoo.")
    parser.add_argument("--zoo", default="work/zoo", help="zoo root (default work/zoo)")
    parser.add_argument("--benchmark", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    print(format_listing(Zoo(args.zoo).list(args.benchmark)))


if __name__ == "__main__":
    main()
