"""Extractor registry: embedding sizes (full specs on the meta device, tiny variants for real),
weights resolution and loading, and the transformers-layout conversion."""

from __future__ import annotations

import pytest
import torch

from gen_ad.baselines import extractors
from gen_ad.baselines.extractors import (
    FeatureExtractor,
    build_extractor,
    create_backbone,
    extractor_names,
    get_spec,
    hf_to_timm,
    load_backbone_weights,
)
from gen_ad.errors import CheckpointError, ConfigError, WeightsNotFoundError
from gen_ad.utils.io import save_safetensors, torch_save

# name -> (embedding dim, parameter count in millions, rounded) of the published models
EXPECTED = {
    "virchow2": (2560, 631), "virchow": (2560, 631), "uni": (1024, 303),
    "uni2-h": (1536, 681), "phikon": (768, 86), "phikon-v2": (1024, 303),
    "h-optimus-0": (1536, 1135), "lunit-dino-vits8": (384, 22), "dino-vits16": (384, 22),
    "dino-resnet50": (2048, 24), "resnet50": (2048, 24),
    "vgg16-imagenet": (896, 8), "inception-fid": (2048, 24),
    "colour-stats": (15, 0),  # no network: 15 colour statistics (the shortcut baseline)
}


def test_registry_names_lowercase_and_complete() -> None:
    assert set(extractor_names()) == set(EXPECTED)
    assert all(n == n.lower() for n in extractor_names())
    with pytest.raises(ConfigError, match="unknown extractor"):
        get_spec("virchow3")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_spec_dims_on_meta_device(name: str) -> None:
    """The full-size network (built on the meta device: no memory) gives the published sizes."""
    spec = get_spec(name)
    import timm
    from packaging.version import Version

    if spec.arch.startswith("vit_") and Version(timm.__version__) < Version("1.0.21"):
        # compat (test only): timm < 1.0.21 calls .item() on the drop-path rates while it builds a
        # ViT, which the meta device refuses; real builds (CPU/GPU) work from the 0.9.12 floor
        pytest.skip(f"timm {timm.__version__} < 1.0.21 cannot build a ViT on the meta device")
    dim, mparams = EXPECTED[name]
    assert spec.dim == dim
    with torch.device("meta"):
        backbone = create_backbone(spec)
        ext = FeatureExtractor(spec, backbone, spec.input_size, spec.dim)
        y = ext(torch.zeros(2, 3, 64, 64))
    assert y.shape == (2, dim)
    assert round(sum(p.numel() for p in backbone.parameters()) / 1e6) == mparams


def test_register_tokens_and_embedding_rule_arithmetic() -> None:
    assert get_spec("virchow2").kwargs["reg_tokens"] == 4
    assert get_spec("uni2-h").kwargs["reg_tokens"] == 8
    assert get_spec("h-optimus-0").mean == (0.707223, 0.578729, 0.703617)
    assert get_spec("virchow2").embed == "cls+mean" and get_spec("uni").embed == "cls"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_random_init_builds_and_embeds(name: str) -> None:
    ext = build_extractor(name, random_init=True, tiny=True)
    x = torch.rand(3, 3, 48, 40) * 2 - 1  # any size: resized inside
    y = ext(x)
    assert y.shape == (3, ext.dim) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert not any(p.requires_grad for p in ext.parameters())


def test_virchow_rule_is_cls_plus_mean_of_patch_tokens() -> None:
    ext = build_extractor("virchow2", random_init=True, tiny=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = ext.backbone.forward_features(ext.preprocess(x))
    n_prefix = 1 + 4  # class token + 4 registers
    ref = torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)
    torch.testing.assert_close(ext(x), ref)
    assert ext.dim == 2 * 32


def test_random_init_is_deterministic() -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = build_extractor("uni", random_init=True, tiny=True, seed=3)(x)
    b = build_extractor("uni", random_init=True, tiny=True, seed=3)(x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads(tmp_path, suffix: str) -> None:
    ref = build_extractor("h-optimus-0", random_init=True, tiny=True, seed=7)
    path = tmp_path / f"weights{suffix}"
    sd = ref.backbone.state_dict()
    (save_safetensors if suffix == ".safetensors" else torch_save)(path, sd)
    loaded = build_extractor("h-optimus-0", weights=str(path), tiny=True, seed=0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), ref(x))
    # a folder holding the file works too
    loaded_dir = build_extractor("h-optimus-0", weights=str(tmp_path), tiny=True)
    torch.testing.assert_close(loaded_dir(x), ref(x))


def test_hf_cache_snapshot_is_found(tmp_path, monkeypatch) -> None:
    """A file placed in the Hugging Face cache layout is used without any network."""
    ref = build_extractor("resnet50", random_init=True, tiny=True, seed=5)
    snap = tmp_path / "hub" / "models--timm--resnet50.tv_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--resnet50.tv_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet50.tv_in1k" / "refs" / "main").write_text("abc")
    save_safetensors(snap / "model.safetensors", ref.backbone.state_dict())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from gen_ad.baselines.extractors import _from_caches

    assert _from_caches(get_spec("resnet50")) == snap / "model.safetensors"


def test_offline_without_weights_names_repo_file_and_place() -> None:
    with pytest.raises(WeightsNotFoundError) as e:
        build_extractor("virchow2")
    msg = str(e.value)
    assert "paige-ai/Virchow2" in msg and "pytorch_model.bin" in msg and "--weights" in msg
    assert "gated" in msg
    with pytest.raises(WeightsNotFoundError, match="dino_resnet50_pretrain.pth"):
        build_extractor("dino-resnet50")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_extractor("uni", weights="/nonexistent/uni.bin")


def test_mismatched_weights_are_a_clear_error(tmp_path) -> None:
    other = build_extractor("dino-vits16", random_init=True, tiny=True)
    path = tmp_path / "w.safetensors"
    save_safetensors(path, other.backbone.state_dict())
    with pytest.raises(CheckpointError, match="do not fit extractor 'virchow2'"):
        build_extractor("virchow2", weights=str(path), tiny=True)


def _timm_to_hf_vit(sd: dict[str, torch.Tensor], dinov2: bool) -> dict[str, torch.Tensor]:
    """Test-side inverse mapping to the transformers (v4) ViTModel / Dinov2Model key names."""
    out = {"embeddings.cls_token": sd["cls_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
           "pooler.dense.weight": torch.zeros(1)}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    names = ({"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
              "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
             if dinov2 else {"norm1": "layernorm_before", "norm2": "layernorm_after",
                             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
    names["attn.proj"] = "attention.output.dense"
    for i in range(depth):
        for t, h in names.items():
            for suf in ((".weight", ".bias") if "gamma" not in t else ("",)):
                out[f"encoder.layer.{i}.{h}{suf}"] = sd[f"blocks.{i}.{t}{suf}"]
        for suf in (".weight", ".bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv{suf}"].chunk(3, dim=0)
            for n, t in (("query", q), ("key", k), ("value", v)):
                out[f"encoder.layer.{i}.attention.attention.{n}{suf}"] = t
    return out


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_transformers_layout_checkpoint_converts(name: str) -> None:
    ref = build_extractor(name, random_init=True, tiny=True, seed=11)
    hf = _timm_to_hf_vit(ref.backbone.state_dict(), dinov2=name == "phikon-v2")
    assert set(hf_to_timm(hf, get_spec(name).layout)) == set(ref.backbone.state_dict())
    fresh = build_extractor(name, random_init=True, tiny=True, seed=0)
    load_backbone_weights(fresh.backbone, fresh.spec, hf)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(fresh(x), ref(x))


def test_bad_input_shape() -> None:
    ext = build_extractor("dino-vits16", random_init=True, tiny=True)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        ext(torch.zeros(2, 1, 32, 32))


def test_registry_installed_extractors_use_the_installed_files() -> None:
    """vgg16-imagenet / inception-fid read `gen-ad weights install` files; embeddings are the
    documented layers (VGG16 relu2_2 + relu3_3 + relu4_3, raw pools at the given size; FID
    pool3)."""
    from gen_ad.metrics.inception import load_inception, random_inception_state_dict, to_uint8
    from gen_ad.weights.registry import installed_path

    with pytest.raises(WeightsNotFoundError, match="gen-ad weights install --only lpips-vgg16"):
        build_extractor("vgg16-imagenet")
    ref = build_extractor("vgg16-imagenet", random_init=True, seed=2)
    full = {**ref.backbone.state_dict(), "lin0.model.1.weight": torch.rand(1, 64, 1, 1),
            "features.24.weight": torch.rand(512, 512, 3, 3)}  # the file's conv5: ignored
    save_safetensors(installed_path("lpips-vgg16"), full)
    ext = build_extractor("vgg16-imagenet")
    assert ext.input_size == 224  # the default load size; the network takes any size >= 16
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    h, pooled = ext.preprocess(x), []
    assert h.shape == (2, 3, 40, 40)  # not resized: the patches' own resolution
    for i, layer in enumerate(ref.backbone.features):
        h = layer(h)
        if i in (8, 15, 22):
            pooled.append(h.mean(dim=(2, 3)))
    assert [p.shape[1] for p in pooled] == [128, 256, 512]
    torch.testing.assert_close(ext(x), torch.cat(pooled, 1))
    assert ext(x).shape == (2, 896) and bool((ext(x) >= 0).all())  # raw ReLU pools
    with pytest.raises(ValueError, match="at least 16 px"):
        ext(torch.zeros(1, 3, 12, 12))

    save_safetensors(installed_path("fid-inception"), random_inception_state_dict(seed=4))
    inc = build_extractor("inception-fid")
    with pytest.warns(RuntimeWarning, match="not a known FID Inception"):
        fid = load_inception(device="cpu")  # the same installed file, FID's own path
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    torch.testing.assert_close(inc(x), fid(to_uint8(x)), rtol=1e-5, atol=1e-5)
    # random weights, not the registry's installed tensors: not labelled FID
    assert not fid.is_inception and fid.label == "fd_inception-v3-custom"


def _fake_repo(root, names: tuple[str, ...], main: str | None):
    """A ``models--*`` cache tree with one weights file per snapshot (content = its name)."""
    import os

    repo = root / "models--paige-ai--Virchow2"
    for j, name in enumerate(names):
        snap = repo / "snapshots" / name
        snap.mkdir(parents=True)
        (snap / "pytorch_model.bin").write_bytes(name.encode())
        os.utime(snap, (1_000_000 + j, 1_000_000 + j))  # later in `names` = newer
    if main is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main + "\n")
    return repo


def test_weights_folder_uses_the_snapshot_refs_main_points_to(tmp_path) -> None:
    """Not the alphabetically first snapshot: the one refs/main names, else the newest."""
    from gen_ad.baselines.extractors import find_weights_file, resolve_weights

    repo = _fake_repo(tmp_path / "a", ("0aaa", "f00d", "9bbb"), main="f00d")
    assert find_weights_file(repo) == repo / "snapshots" / "f00d" / "pytorch_model.bin"
    assert resolve_weights(get_spec("virchow2"), repo).read_bytes() == b"f00d"
    repo = _fake_repo(tmp_path / "b", ("0aaa", "f00d", "9bbb"), main=None)
    assert find_weights_file(repo) == repo / "snapshots" / "9bbb" / "pytorch_model.bin"


def test_unreachable_hub_is_reported_as_offline(monkeypatch) -> None:
    """huggingface_hub's LocalEntryNotFoundError (no connection) is a subclass of
    EntryNotFoundError; it must not read as "file not in the repo" / "no source"."""
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def unreachable(**kw: object) -> str:
        raise LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online as far as the settings go
    monkeypatch.setattr(extractors, "hub_unreachable", lambda repo, f: None)  # probe passes
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsNotFoundError) as e:
        build_extractor("uni")
    msg = str(e.value)
    assert "the hub is unreachable (offline)" in msg and "no source" not in msg
    assert "pytorch_model.bin or model.safetensors" in msg and "MahmoodLab/UNI" in msg
    assert "--weights" in msg and "$HF_HOME/hub" in msg


def test_training_resolution_is_recorded_per_model() -> None:
    from gen_ad.baselines.extractors import describe, training_resolution

    for name in ("uni", "phikon", "phikon-v2", "h-optimus-0", "virchow"):
        spec = get_spec(name)
        assert (spec.train_mpp, spec.train_magnification) == (0.5, "20x")
        assert "gen-ad tile --mpp 0.5" in training_resolution(spec)
    v2 = get_spec("virchow2")
    assert v2.train_mpp is None and v2.train_magnification == "mixed 5x-40x"
    assert "mixed 5x-40x" in training_resolution(v2)
    assert get_spec("dino-vits16").train_magnification == "unknown"
    assert "not stated" in training_resolution(get_spec("uni2-h"))
    assert describe(get_spec("uni"))["train_mpp"] == 0.5
    colour = training_resolution(get_spec("colour-stats"))  # no network: no model card
    assert "resolution-free" in colour and "model card" not in colour
    assert "no model card" in training_resolution(get_spec("vgg16-imagenet"))


def _write_shards(folder, sd: dict[str, torch.Tensor], n: int = 3) -> None:
    """``sd`` split into ``n`` Hugging Face safetensors shards plus their index."""
    import json

    keys = sorted(sd)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_safetensors(folder / name, part)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_weights_load_every_shard(tmp_path) -> None:
    """A folder of sharded safetensors (or its index) loads all shards, not the first one."""
    from gen_ad.baselines.extractors import find_weights_file, weights_identity

    ref = build_extractor("h-optimus-0", random_init=True, tiny=True, seed=7)
    _write_shards(tmp_path / "w", ref.backbone.state_dict())
    assert find_weights_file(tmp_path / "w") == tmp_path / "w" / "model.safetensors.index.json"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for given in (tmp_path / "w", tmp_path / "w" / "model.safetensors.index.json"):
        loaded = build_extractor("h-optimus-0", weights=str(given), tiny=True, seed=0)
        torch.testing.assert_close(loaded(x), ref(x))
    ident = weights_identity(loaded, random_init=False)
    assert ident["shards"] == 3 and ident["file"].endswith("model.safetensors.index.json")
    # the identity covers the shards' contents, not only the index
    shard = tmp_path / "w" / "model-00002-of-00003.safetensors"
    from safetensors.torch import load_file

    sd2 = {k: v + 1 for k, v in load_file(shard).items()}
    save_safetensors(shard, sd2)
    assert weights_identity(loaded, random_init=False)["sha256"] != ident["sha256"]
    shard.unlink()  # a missing shard is named
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors is missing"):
        build_extractor("h-optimus-0", weights=str(tmp_path / "w"), tiny=True)
    (tmp_path / "w" / "model.safetensors.index.json").unlink()  # shards without their index
    with pytest.raises(WeightsNotFoundError, match="sharded weights .* without their index"):
        build_extractor("h-optimus-0", weights=str(tmp_path / "w"), tiny=True)


def test_sharded_weights_from_the_hub_fetch_every_shard(tmp_path, monkeypatch) -> None:
    """A hub repo with only sharded weights: the index and then every shard it lists."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    ref = build_extractor("h-optimus-0", random_init=True, tiny=True, seed=3)
    repo = tmp_path / "repo"
    _write_shards(repo, ref.backbone.state_dict(), n=2)
    fetched: list[str] = []

    def download(repo_id: str, filename: str, **kw: object) -> str:
        if not (repo / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        fetched.append(filename)
        return str(repo / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(extractors, "hub_unreachable", lambda repo, f: None)  # probe passes
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    from gen_ad.baselines.extractors import load_state_dict, resolve_weights

    got = resolve_weights(get_spec("h-optimus-0"), None)  # (tiny variants refuse the hub)
    assert got == repo / "model.safetensors.index.json"
    loaded = build_extractor("h-optimus-0", weights=str(got), tiny=True, seed=0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), ref(x))
    assert load_state_dict(got).keys() == ref.backbone.state_dict().keys()
    assert fetched == ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                       "model-00002-of-00002.safetensors"]
