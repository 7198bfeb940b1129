"""URL's released PyTorch ResNet-18 checkpoints as zoo entries (``cli/import_url.py``).

URL (Li, Liu, Bilen, ICCV 2021; github.com/VICO-UoE/URL) releases its eight
single-domain learners (``<name>-net/model_best.pth.tar``) and its universal model
(``url/model_best.pth.tar``), each ``{'state_dict': ...}`` of its ``models/resnet18.py``:
the network of ``models.ResNet`` (5x5 stride-2 stem with padding 1, no max-pool,
BasicBlocks [2, 2, 2, 2], global average pool). URL's test scripts load both into that
file, the universal model too (trained as ``resnet18_mdl.py``, whose stem pads by 2),
so padding 1 is how URL evaluates them. Inputs are Meta-Dataset's [-1, 1] in both code
bases (``data/sources.py``), so embeddings compare as they are.

:func:`convert` maps a state dict (name -> array, PyTorch layout) to our
``{params, batch_stats}``; :func:`write_entry` stores the result through the zoo's write
path as method ``url-sdl`` (``<domain>/url-sdl``) or ``url`` (``universal/url``), with
the source file's sha256. Imported entries are never trained or reused as erm/sam ones
(``entry_keys.entry_kind``: ``imported``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from flatfsc_jax import errors, families, models
from flatfsc_jax import zoo as zoo_lib

# Meta-Dataset domain -> URL's directory of its single-domain learner
# (URL models/models_dict.py DATASET_MODELS_RESNET18); the universal model is "url".
SDL_DIRS = {
    "ilsvrc_2012": "imagenet-net",
    "omniglot": "omniglot-net",
    "aircraft": "aircraft-net",
    "cu_birds": "birds-net",
    "dtd": "textures-net",
    "quickdraw": "quickdraw-net",
    "fungi": "fungi-net",
    "vgg_flower": "vgg_flower-net",
}
URL_DIR = "url"
# URL's reader draws 84 x 84 RGB images (data/meta_dataset_reader.py image_size=84).
IMAGE_SHAPE = (84, 84, 3)
SOURCE = "URL (Li, Liu, Bilen, ICCV 2021), github.com/VICO-UoE/URL"
# Classifier heads (``cls_fn`` of URL's resnet18 / resnet18_mdl): we only embed.
HEAD_PREFIX = "cls_fn."
_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


class ConversionError(ValueError):
    """A state dict that is not URL's ResNet-18 (a missing, unexpected or misshapen key)."""


class CheckpointFileError(errors.FlatfscError):
    """URL's checkpoint file cannot be found or read (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class Converted:
    """``variables``: ``{params, batch_stats}`` of ``models.build_model("resnet18", 0,
    width=width)``; ``dropped``: the classifier-head keys left out."""

    variables: dict
    width: float
    dropped: tuple[str, ...]


def layout(stage_sizes=(2, 2, 2, 2)) -> tuple[list, list]:
    """(convolutions, batch norms): ``(torch prefix, flax module path)`` pairs of the
    ResNet, in PyTorch's names (``layer2.0.downsample.0``) and ours (``BasicBlock_2/Conv_2``)."""
    convs, norms = [("conv1", ("Conv_0",))], [("bn1", ("BatchNorm_0",))]
    block = 0
    for layer, n in enumerate(stage_sizes, start=1):
        for b in range(n):
            name, prefix = f"BasicBlock_{block}", f"layer{layer}.{b}"
            convs += [(f"{prefix}.conv1", (name, "Conv_0")), (f"{prefix}.conv2", (name, "Conv_1"))]
            norms += [
                (f"{prefix}.bn1", (name, "BatchNorm_0")),
                (f"{prefix}.bn2", (name, "BatchNorm_1")),
            ]
            if layer > 1 and b == 0:  # stride 2 and twice the channels: a projection
                convs.append((f"{prefix}.downsample.0", (name, "Conv_2")))
                norms.append((f"{prefix}.downsample.1", (name, "BatchNorm_2")))
            block += 1
    return convs, norms


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def target_shapes(width: float) -> dict:
    """Shapes of ``models.ResNet``'s trunk variables at ``width`` (no head)."""
    model = models.build_model("resnet18", 0, width=width)
    sample = jnp.zeros((1, 32, 32, 3), jnp.float32)  # the variables do not depend on it
    return jax.eval_shape(lambda: model.init(jax.random.key(0), sample))


def convert(state_dict, *, width: float | None = None) -> Converted:
    """URL's ResNet-18 state dict (name -> array in PyTorch layout) -> our variables.

    Convolutions go from OIHW to HWIO; batch norm ``weight``/``bias`` become
    ``scale``/``bias`` and ``running_mean``/``running_var`` the ``batch_stats``
    ``mean``/``var`` (eps 1e-5 in both). ``num_batches_tracked`` and the classifier heads
    (``cls_fn.*``) are dropped; a ``module.`` prefix on every key (``DataParallel``) is
    removed. ``width``: the channel multiplier (None: from ``conv1.weight``, 64 channels
    = 1.0). Raises :class:`ConversionError` naming every missing or unexpected key and
    any key whose shape is not the one ``models.ResNet`` needs.
    """
    sd = {str(k): np.asarray(v) for k, v in dict(state_dict).items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if "conv1.weight" not in sd:
        raise ConversionError(
            "state dict has no 'conv1.weight': not URL's ResNet-18 (keys like "
            f"{sorted(sd)[:5]}); expected conv1.weight, bn1.*, layer1..4.*"
        )
    if width is None:
        width = sd["conv1.weight"].shape[0] / 64
    target = target_shapes(width)
    convs, norms = layout()
    wanted = {}  # torch key -> (flax collection path, PyTorch-layout shape, transform)
    for prefix, path in convs:
        hwio = _get(target["params"], (*path, "kernel")).shape
        wanted[f"{prefix}.weight"] = (
            ("params", *path, "kernel"),
            (hwio[3], hwio[2], hwio[0], hwio[1]),
            lambda w: np.transpose(w, (2, 3, 1, 0)),
        )
    for prefix, path in norms:
        (c,) = _get(target["params"], (*path, "scale")).shape
        for field, (collection, name) in _BN_FIELDS.items():
            wanted[f"{prefix}.{field}"] = ((collection, *path, name), (c,), lambda v: v)
    optional = {f"{prefix}.num_batches_tracked" for prefix, _ in norms}
    dropped = tuple(sorted(k for k in sd if k.startswith(HEAD_PREFIX)))
    missing = [f"{k} {shape}" for k, (_, shape, _) in wanted.items() if k not in sd]
    unexpected = sorted(set(sd) - set(wanted) - optional - set(dropped))
    problems = []
    if missing:
        problems.append(f"missing keys (expected shape): {missing[:8]}")
    if unexpected:
        problems.append(
            f"unexpected keys: {unexpected[:8]} (URL's resnet18 has conv1, bn1, "
            f"layer1..4.{{0,1}}.{{conv1,bn1,conv2,bn2}}, layer2..4.0.downsample.{{0,1}} and "
            f"the {HEAD_PREFIX}* head, which is dropped)"
        )
    wrong = [
        f"{k}: {tuple(sd[k].shape)}, expected {shape}"
        for k, (_, shape, _) in wanted.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if wrong:
        problems.append(f"shape mismatch at width {width:g}: {wrong[:8]}")
    if problems:
        raise ConversionError("not URL's ResNet-18 state dict: " + "; ".join(problems))
    variables: dict = {"params": {}, "batch_stats": {}}
    for k, (path, _, transform) in wanted.items():
        _set(variables, path, np.ascontiguousarray(transform(sd[k]), dtype=np.float32))
    # Every variable of models.ResNet is filled, with its shape (a changed layout fails).
    have = {jax.tree_util.keystr(p): x.shape for p, x in _leaves(variables)}
    need = {jax.tree_util.keystr(p): x.shape for p, x in _leaves(target)}
    if have != need:
        raise ConversionError(
            f"converted variables differ from models.ResNet's: {sorted(set(have) ^ set(need))[:5]}"
        )
    return Converted(variables, float(width), dropped)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def file_sha256(path) -> str:
    """sha256 of one file (the imported checkpoint, recorded in the entry)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def entry_location(domain: str | None) -> tuple[str, str]:
    """(zoo domain, method) of an import: a single-domain learner of ``domain``, or the
    universal model (``domain=None``)."""
    if domain is None:
        return families.URL_DOMAIN, "url"
    if domain not in SDL_DIRS:
        raise ValueError(
            f"URL has no single-domain learner for {domain!r}; it has {list(SDL_DIRS)}"
        )
    return domain, "url-sdl"


def write_entry(
    zoo: zoo_lib.Zoo,
    converted: Converted,
    *,
    domain: str | None,
    source_file: str,
    source_sha256: str,
    benchmark: str = "meta_dataset",
) -> zoo_lib.ZooEntry:
    """Stores an imported backbone as a complete zoo entry (``Zoo.write``): a single-domain
    learner of ``domain`` as ``<domain>/url-sdl``, the universal model (``domain=None``)
    as ``universal/url``. Its metadata says where it came from."""
    zdomain, method = entry_location(domain)
    metadata = {
        "imported": {
            "from": SOURCE,
            "model": "universal" if domain is None else "single-domain learner",
            "trained_on": "8 seen domains" if domain is None else domain,
            "file": source_file,
            "sha256": source_sha256,
            "dropped_keys": list(converted.dropped),
        },
    }
    model_config = dict(arch="resnet18", width=converted.width, dtype="float32", num_classes=0)
    with zoo.entry_lock(benchmark, zdomain, method):
        return zoo.write(
            benchmark,
            zdomain,
            method,
            variables=converted.variables,
            model_config=model_config,
            image_shape=IMAGE_SHAPE,
            metadata=metadata,
        )


INSTALL = (
    "reading URL's .pth.tar checkpoints needs PyTorch: "
    "bash scripts/setup_env.sh dev,url_import  (or: pip install -e '.[url_import]')"
)


def load_state_dict(path: pathlib.Path, *, trust: bool = False) -> dict:
    """The ``state_dict`` of a PyTorch checkpoint as name -> numpy array."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointFileError(INSTALL) from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        raise CheckpointFileError(
            f"{path}: torch's safe loader refused it ({str(e)[:200]}); if it comes from "
            "URL's own download links, rerun with --trust_pickle"
        ) from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointFileError(
            f"{path}: no 'state_dict' in the checkpoint ({type(ckpt).__name__})"
        )
    return {k: v.detach().cpu().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def find(root: pathlib.Path, name: str) -> pathlib.Path:
    """The one ``<name>/model_best.pth.tar`` under ``root``."""
    hits = sorted(root.rglob(f"{name}/model_best.pth.tar"))
    if len(hits) != 1:
        raise CheckpointFileError(
            f"expected one {name}/model_best.pth.tar under {root}, found {len(hits)}: "
            f"{[str(h) for h in hits][:4]}; unzip URL's sdl.zip / url.zip there "
            "(docs/meta-dataset.md#cross-check-against-url)"
        )
    return hits[0]
