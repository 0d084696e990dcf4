"""The dependency floors in pyproject.toml are true.

Users behind a hospital package mirror often get exactly the floor (the mirror carries old
releases, and pip takes what is there), so a floor below what the code calls is a broken install.
``NEEDED`` is the audit: for each distribution, the oldest release the code works with and the API
(or the failure) that sets it. The floors were checked by running the unit suite in a Python 3.11
venv with every dependency at its floor (torch excepted: see its row). When code starts to need a
newer release, raise the floor in pyproject.toml and the row here, naming the API.

Four checks: every declared floor is at least the audited one; every runtime dependency has a
floor; requires-python matches the audit (and ruff's target); the installed versions meet the
floors. The probes at the end call the APIs that set the floors, so a venv built from the floors
shows which one broke.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+, and pytest depends on tomli there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

PYTHON = (3, 10)  # syntax and stdlib names checked against CPython 3.10 (datetime.UTC is 3.11+)

# distribution -> (oldest release the code works with, why)
NEEDED: dict[str, tuple[str, str]] = {
    "torch": ("2.6", "torch.load(weights_only=True) of torch <= 2.5.1 can be made to run code "
              "(CVE-2025-32434; every .pt/.pth gen_ad reads goes through it); also "
              "torch.is_autocast_enabled(device_type) (gen_ad/training/grid_sample.py, 2.4) and "
              "NumPy 2 builds (2.3)"),
    "torchvision": ("0.21", "the release paired with torch 2.6"),
    "accelerate": ("0.30", "Accelerator(cpu=, mixed_precision=, log_with=, project_dir=), "
                   "utils.broadcast_object_list; the training tests pass at 0.30.0"),
    "diffusers": ("0.29", "0.27/0.28 import huggingface_hub.cached_download, removed in "
                  "huggingface_hub 0.26: `import diffusers` fails beside a current hub"),
    "huggingface-hub": ("0.23.2", "try_to_load_from_cache / hf_hub_download imported directly "
                        "(gen_ad/baselines/extractors.py); diffusers 0.29 needs 0.23.2"),
    "lpips": ("0.1.4", "the only release with the v0.1 linear heads shipped in the package"),
    "torch-fidelity": ("0.3", "feature_extractor_inceptionv3, metric_fid "
                       "fid_features_to_statistics, metric_kid kid_features_to_metric"),
    "einops": ("0.7", "rearrange/reduce patterns; the suite passes at 0.7.0"),
    "safetensors": ("0.4", "safetensors.torch load (bytes), load_file, save, safe_open"),
    "numpy": ("1.24", "no NumPy-2-only names; the suite passes at 1.24.4"),
    "scipy": ("1.13", "stats.mannwhitneyu(method=stats.PermutationMethod(...)) "
              "(gen_ad/metrics/stats.py) is 1.13; stats.dunnett is 1.11"),
    "scikit-learn": ("1.3", "sklearn.metrics roc_curve / precision_recall_curve / "
                     "roc_auc_score / average_precision_score"),
    "scikit-image": ("0.22", "rgb2hed/hed2rgb, threshold_otsu, peak_local_max, watershed"),
    "pillow": ("10.0", "Image.Resampling (9.1), ImageDraw.textbbox"),
    "pyyaml": ("6.0", "yaml.safe_load / safe_dump"),
    "tqdm": ("4.66", "tqdm.auto"),
    "matplotlib": ("3.7", "Figure + FigureCanvasAgg without pyplot, path.Path"),
    "openslide-python": ("1.4", "1.3 cannot find the library that openslide-bin installs "
                         "(`import openslide` raises OSError)"),
    "openslide-bin": ("4.0", "the OpenSlide library as a wheel"),
    "tiffslide": ("2.5.1", "2.4 and 2.5.0 leave tifffile uncapped, and `import tiffslide` "
                  "fails on a current tifffile (no ZarrTiffStore); 2.5.1 caps it"),
    "tifffile": ("2023.7.4", "imread(key=) imported directly (gen_ad/data/folders.py); "
                 "tiffslide 2.5's floor"),
    "imagecodecs": ("2024.6.1", "2024.1.1 is a source-only release on PyPI: pip would build it "
                    "from C sources (libaec and others), which fails on a plain machine"),
    "torchstain": ("1.3", "torchstain.numpy.utils rgb2lab / lab2rgb"),
    "timm": ("0.9.12", "VisionTransformer(reg_tokens=) is 0.9.8 (Virchow2, UNI2-h), "
             "vit_giant_patch14_reg4_dinov2 0.9.9 (H-optimus-0), resnet50(layers=...) "
             "for --tiny 0.9.12"),
    "faiss-cpu": ("1.8", "IndexFlatL2 / IndexIVFFlat search; the knn tests pass at 1.8.0"),
    "faiss-gpu-cu12": ("1.8", "the GPU twin of faiss-cpu 1.8"),
    "pytest": ("8.0", "the suite runs on pytest 8.0.0"),
}


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _requirements() -> list[tuple[str, Requirement]]:
    """``(where, requirement)`` for the runtime dependencies and every extra."""
    project = _pyproject()["project"]
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return out


def _floor(req: Requirement) -> Version | None:
    """The lowest version ``req`` admits (``>=``, ``==``, ``~=``), or None without a floor."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows) if lows else None


def test_floors_meet_what_the_code_needs() -> None:
    wrong = []
    for where, req in _requirements():
        name = canonicalize_name(req.name)
        if name not in NEEDED:
            continue
        need, why = NEEDED[name]
        floor = _floor(req)
        if floor is None or floor < Version(need):
            wrong.append(f"{where}: {req} admits {floor or 'any release'}, the code needs "
                         f">={need}: {why}")
    assert not wrong, "dependency floors below what the code needs:\n" + "\n".join(wrong)


def test_every_runtime_dependency_has_an_audited_floor() -> None:
    missing = [str(req) for where, req in _requirements()
               if where in ("dependencies", "[cpu]", "[gpu]")
               and (_floor(req) is None or canonicalize_name(req.name) not in NEEDED)]
    assert not missing, ("runtime dependencies without a floor, or without a row in NEEDED "
                         f"(add the oldest release the code works with, and why): {missing}")


def test_requires_python_matches_the_audit() -> None:
    data = _pyproject()
    spec = data["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r}: expected a plain '>=3.X' floor"
    assert (int(m[1]), int(m[2])) == PYTHON, (
        f"requires-python {spec!r} but the code is audited for Python {PYTHON[0]}.{PYTHON[1]}")
    target = data["tool"]["ruff"]["target-version"]
    assert target == f"py{PYTHON[0]}{PYTHON[1]}", f"ruff target-version {target!r} != {spec!r}"


def test_installed_versions_meet_the_floors() -> None:
    """The environment running the suite is one that pyproject.toml allows (a venv assembled by
    hand or from PYTHONPATH can hold a release older than the floor)."""
    bad = []
    for where, req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if where == "dependencies":
                bad.append(f"{req.name} is not installed")
            continue  # an extra that this environment did not ask for
        if not req.specifier.contains(Version(have), prereleases=True):
            bad.append(f"{req.name} {have} does not satisfy {req} ({where})")
    if sys.version_info < PYTHON:
        bad.append(f"Python {sys.version.split()[0]} is below the audited {PYTHON}")
    assert not bad, "installed versions outside pyproject.toml:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- probes
# Each calls the API that sets a floor above the previous one, so a floor venv names its culprit.


def test_probe_torch_autocast_query_takes_a_device() -> None:
    import torch

    assert torch.is_autocast_enabled("cpu") is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") is True


def test_probe_scipy_mannwhitneyu_takes_a_permutation_method() -> None:
    import numpy as np
    from scipy import stats

    res = stats.mannwhitneyu([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], alternative="two-sided",
                             method=stats.PermutationMethod(n_resamples=np.inf))
    assert res.pvalue == pytest.approx(0.1)  # exact: 2 of the 20 splits are as extreme


def test_probe_diffusers_imports_beside_the_installed_hub() -> None:
    from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401
    from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: F401


def test_probe_slide_readers_import() -> None:
    import tiffslide  # noqa: F401

    try:
        import openslide
    except OSError as e:  # openslide-python < 1.4 does not look in openslide-bin
        pytest.fail(f"import openslide: {e}")
    assert openslide.__library_version__


def test_probe_timm_builds_register_token_and_tiny_resnet_backbones() -> None:
    import timm
    import torch

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                            img_size=32, embed_dim=32, depth=1, num_heads=2, reg_tokens=4)
    assert vit.num_prefix_tokens == 5
    assert "vit_giant_patch14_reg4_dinov2" in timm.list_models("vit_giant_patch14_reg4_dinov2")
    net = timm.create_model("resnet50", pretrained=False, num_classes=0, layers=(1, 1, 1, 1))
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
