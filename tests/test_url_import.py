"""URL checkpoint import (url_import.py): a state dict with URL's key names, built here,
converts to variables whose embeddings match an independent NumPy forward pass of URL's
ResNet-18 in PyTorch layout (NCHW / OIHW, eval-mode batch norm); bad state dicts fail
naming the key; the imported entry is read by the evaluator and never taken for erm/sam.
"""

import numpy as np
import pytest

from configs import meta_dataset_table
from flatfsc_jax import config_lib, experiment, families, models, url_import
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.evaluation import protocol

EPS = 1e-5  # PyTorch BatchNorm2d's default, URL's


def url_state_dict(base=8, num_classes=10, seed=0):
    """Random weights under URL's resnet18 key names (models/resnet18.py), stem width base."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
        sd[f"{name}.num_batches_tracked"] = np.array(1000)

    conv("conv1", base, 3, 5)
    bn("bn1", base)
    inplanes = base
    for layer in range(1, 5):
        planes = base * 2 ** (layer - 1)
        for b in range(2):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", planes, inplanes if b == 0 else planes, 3)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            if layer > 1 and b == 0:
                conv(f"{p}.downsample.0", planes, inplanes, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    sd["cls_fn.weight"] = rng.normal(0, 0.1, (num_classes, 8 * base))
    sd["cls_fn.bias"] = np.zeros(num_classes)
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in sd.items()}


# --- an independent reference: URL's forward pass in PyTorch layout, plain NumPy ---------


def conv_nchw(x, w, stride, padding):
    n, c, h, wd = x.shape
    o, i, k, _ = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for a in range(k):
        for b in range(k):
            patch = x[
                :, :, a : a + stride * (oh - 1) + 1 : stride, b : b + stride * (ow - 1) + 1 : stride
            ]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
    return out


def bn_eval(x, sd, name):
    def v(f):
        return sd[f"{name}.{f}"][None, :, None, None]

    return (x - v("running_mean")) / np.sqrt(v("running_var") + EPS) * v("weight") + v("bias")


def url_embed(sd, x):
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    x = relu(bn_eval(conv_nchw(x, sd["conv1.weight"], 2, 1), sd, "bn1"))
    for layer in range(1, 5):
        for b in range(2):
            p, stride = f"layer{layer}.{b}", 2 if layer > 1 and b == 0 else 1
            out = relu(bn_eval(conv_nchw(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
            out = bn_eval(conv_nchw(out, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = conv_nchw(x, sd[f"{p}.downsample.0.weight"], stride, 0)
                x = bn_eval(x, sd, f"{p}.downsample.1")
            x = relu(out + x)
    return x.mean(axis=(2, 3))


def _images(n=2, size=32, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


# --- tests ---------------------------------------------------------------------------------


def test_embeddings_match_urls_forward_pass():
    sd = url_state_dict()
    converted = url_import.convert(sd)
    assert converted.width == 0.125 and converted.dropped == ("cls_fn.bias", "cls_fn.weight")
    x = _images()
    model = models.build_model("resnet18", 0, width=converted.width)
    ours = np.asarray(model.embed(converted.variables, np.transpose(x, (0, 2, 3, 1))))
    ref = url_embed({k: v.astype(np.float64) for k, v in sd.items()}, x.astype(np.float64))
    assert ours.shape == (2, 64)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_urls_full_width_and_dataparallel_prefix_are_accepted():
    sd = {f"module.{k}": v for k, v in url_state_dict(base=64, num_classes=3).items()}
    converted = url_import.convert(sd)
    assert converted.width == 1.0
    assert converted.variables["params"]["Conv_0"]["kernel"].shape == (5, 5, 3, 64)
    block = converted.variables["params"]["BasicBlock_7"]
    assert block["Conv_1"]["kernel"].shape == (3, 3, 512, 512)
    assert models.count_params(converted.variables["params"]) == 11_171_904


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: sd.pop("layer3.1.bn2.running_var"),
            r"missing keys.*layer3\.1\.bn2\.running_var",
        ),
        (
            lambda sd: sd.update({"layer2.0.conv1.weight": np.zeros((16, 16, 3, 3), np.float32)}),
            r"layer2\.0\.conv1\.weight: \(16, 16, 3, 3\), expected \(16, 8, 3, 3\)",
        ),
        (
            lambda sd: sd.update({"fc.weight": np.zeros((5, 64))}),
            r"unexpected keys: \['fc\.weight'\]",
        ),
        (lambda sd: sd.pop("conv1.weight"), r"no 'conv1\.weight'"),
    ],
)
def test_bad_state_dicts_name_the_key(change, message):
    sd = url_state_dict()
    change(sd)
    with pytest.raises(url_import.ConversionError, match=message):
        url_import.convert(sd)


def _config(fams):
    c = meta_dataset_table.meta_dataset_config("erm", "dtd")
    c.evaluation.enabled = True
    c.evaluation.domains = ("dtd", "mnist")
    c.evaluation.families = fams
    return c


def test_imported_entries_are_evaluated_and_never_reused_as_erm(tmp_path, monkeypatch):
    zoo = zoo_lib.Zoo(tmp_path / "zoo")
    sd, sd_url = url_state_dict(seed=0), url_state_dict(seed=1)
    kw = dict(source_file="x.pth.tar", source_sha256="ab" * 32)
    url_import.write_entry(zoo, url_import.convert(sd), domain="dtd", **kw)
    url_import.write_entry(zoo, url_import.convert(sd_url), domain=None, **kw)
    entry = zoo.get("meta_dataset", "dtd", "url-sdl")
    assert entry.metadata["imported"]["sha256"] == "ab" * 32
    assert entry.metadata["model"]["num_classes"] == 0

    c = _config(("url-sdl", "url"))
    assert experiment.evaluated_entries(c) == [("dtd", "url-sdl"), (families.URL_DOMAIN, "url")]
    x = _images()
    embedded = {}

    def evaluate_domain(config, domain, fams, backbone, bar):
        for fam in fams:
            (cand,) = protocol.candidate_backbones(config, fam, domain)
            embedded[fam] = np.asarray(backbone(cand).embed(np.transpose(x, (0, 2, 3, 1))))
        return {}

    monkeypatch.setattr(protocol, "_evaluate_domain", evaluate_domain)
    results = protocol.evaluate_zoo(c, zoo, progress=False)  # the evaluator's own loader
    assert results["families"] == ["url-sdl", "url"]
    for fam, state in (("url-sdl", sd), ("url", sd_url)):
        ref = url_embed({k: v.astype(np.float64) for k, v in state.items()}, x.astype(np.float64))
        np.testing.assert_allclose(embedded[fam], ref, rtol=1e-4, atol=1e-5)

    # Our own erm entry of the same domain is trained, never served by the import...
    record = {"config": config_lib.domain_config(c, "dtd", "erm").to_dict()}
    assert (
        zoo.reuse_or_begin("meta_dataset", "dtd", "erm", record, retrain=False, stage="train")
        is None
    )
    assert zoo.is_complete("meta_dataset", "dtd", "url-sdl")
    # ...and no stage may start a run over an imported entry.
    with pytest.raises(zoo_lib.ZooError, match="imported"):
        zoo.reuse_or_begin("meta_dataset", "dtd", "url-sdl", record, retrain=True, stage="train")
    assert zoo.is_complete("meta_dataset", "dtd", "url-sdl")


def test_without_evaluation_families_the_plan_is_evaluated():
    c = _config(())
    plan = [(p.domain, p.entry_method) for p in experiment.plan(c)]
    assert experiment.evaluated_entries(c) == plan == [("dtd", "erm")]
    assert families.families(c) == ["erm"]


def test_evaluation_families_are_checked_by_validate():
    c = _config(("url-sdl", "url"))
    config_lib.validate(c)
    c.evaluation.families = ("erm+kd",)  # fusion is off in this run
    with pytest.raises(config_lib.ConfigError, match="config.evaluation.families has 'erm\\+kd'"):
        config_lib.validate(c)
    c.evaluation.families = ("url", "url")
    with pytest.raises(config_lib.ConfigError, match="names a family twice"):
        config_lib.validate(c)


def test_reading_checkpoints_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    from flatfsc_jax import url_import as import_url

    ckpt = tmp_path / "url" / "weights" / "url" / "model_best.pth.tar"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not read")
    assert import_url.find(tmp_path, "url") == ckpt
    with pytest.raises(
        import_url.CheckpointFileError, match="expected one imagenet-net/model_best.pth.tar"
    ):
        import_url.find(tmp_path, "imagenet-net")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if not installed
    with pytest.raises(
        import_url.CheckpointFileError,
        match=r"needs PyTorch: bash scripts/setup_env.sh dev,url_import",
    ):
        import_url.load_state_dict(ckpt)
