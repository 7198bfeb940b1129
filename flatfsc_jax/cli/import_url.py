"""Command line: import URL's released ResNet-18 checkpoints into the zoo.

    python -m flatfsc_jax.cli.import_url --saved_results=./saved_results --workdir=work

Finds URL's ``<name>-net/model_best.pth.tar`` (its eight single-domain learners) and
``url/model_best.pth.tar`` (its universal model) under ``--saved_results`` (where URL's
instructions unzip ``sdl.zip`` and ``url.zip``), converts each (``url_import.convert``) and
writes it to ``<workdir>/zoo/meta_dataset/<domain>/url-sdl`` and ``.../universal/url``.
An entry already imported from the same file (same sha256) is kept. Reading the
``.pth.tar`` files needs PyTorch (the ``url_import`` extra); nothing else does.
Then evaluate: docs/meta-dataset.md#cross-check-against-url.
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags

_SAVED = flags.DEFINE_string(
    "saved_results", "./saved_results", "Folder holding URL's unzipped sdl/ and url/ models."
)
_WORKDIR = flags.DEFINE_string("workdir", "work", "The run's workdir (zoo in <workdir>/zoo).")
_MODELS = flags.DEFINE_list(
    "models", "sdl,url", "What to import: sdl (single-domain learners), url (universal)."
)
_TRUST = flags.DEFINE_bool(
    "trust_pickle",
    False,
    "Load with torch.load(weights_only=False): only for files from URL's own links, when "
    "the safe loader refuses one (it may run code stored in the file).",
)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    unknown = set(_MODELS.value) - {"sdl", "url"}
    if unknown:
        raise app.UsageError(f"--models has {sorted(unknown)}; choose among sdl, url")
    from flatfsc_jax import url_import
    from flatfsc_jax import zoo as zoo_lib

    root = pathlib.Path(_SAVED.value).expanduser()
    if not root.is_dir():
        raise SystemExit(f"--saved_results={root} is not a folder; download URL's models first")
    todo = []
    try:
        if "sdl" in _MODELS.value:
            todo += [(d, url_import.find(root, name)) for d, name in url_import.SDL_DIRS.items()]
        if "url" in _MODELS.value:
            todo.append((None, url_import.find(root, url_import.URL_DIR)))
    except url_import.CheckpointFileError as e:
        raise SystemExit(str(e)) from e
    zoo = zoo_lib.Zoo(os.path.join(_WORKDIR.value, "zoo"))
    for domain, path in todo:
        sha = url_import.file_sha256(path)
        zdomain, method = url_import.entry_location(domain)
        key = f"meta_dataset/{zdomain}/{method}"
        if zoo.is_complete("meta_dataset", zdomain, method):
            stored = zoo.get("meta_dataset", zdomain, method).metadata.get("imported", {})
            if stored.get("sha256") == sha:
                print(f"[import] {key}: already imported from {path}, keeping it")
                continue
        try:
            converted = url_import.convert(url_import.load_state_dict(path, trust=_TRUST.value))
        except url_import.CheckpointFileError as e:
            raise SystemExit(str(e)) from e
        except url_import.ConversionError as e:
            raise SystemExit(f"{path}: {e}") from e
        url_import.write_entry(
            zoo, converted, domain=domain, source_file=str(path), source_sha256=sha
        )
        print(f"[import] {key} <- {path} (sha256 {sha[:12]}, width {converted.width:g})")


if __name__ == "__main__":
    app.run(main)
