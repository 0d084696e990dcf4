"""Running ``gen-ad benchmark`` again: a generator's FID/KID computed with the same settings is
reused.

FID/KID of a trained run samples ``fid.n`` images and runs Inception over them and the real
set: minutes per generator, on every run. Each run's values are kept in
``<out>/generators/<run folder name>-<hash of its path>.json``, one file written atomically once
they are computed: the settings (:func:`fid_settings`: the run's export manifest and sampler,
how the real images are read (size, resize mode, stain normalisation), ``fid.n``, ``n_real``,
KID, the sample-piece size when under the chunk of :func:`~gen_ad.app.fid.run_images` (it alone
of the batch size changes the sample set), the seed, the extractor's weights file (path, size,
time) or random initialisation, the real images (names, sizes, times), device, deterministic
mode, gen_ad's version and sources) and their sha256, the values and their sha256, when they
were computed and the environment.

With ``reuse``, a run whose record has the same settings and intact values is reused (one stderr
line saying when it was computed; Inception is not even loaded when every run is); any other
run's record is removed and its FID/KID computed again (one line saying why). Only computed
values are stored: FID/KID that is off, unavailable (no Inception weights, a damaged file) or
failed is computed again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gen_ad.app.benchmark_reuse import Identities
from gen_ad.app.evaluate import PreparedMethod
from gen_ad.app.fid import SAMPLE_CHUNK
from gen_ad.utils.identity import file_identity, settings_changed, settings_digest
from gen_ad.utils.io import write_json

if TYPE_CHECKING:
    from gen_ad.app.benchmark import BenchmarkConfig, FIDConfig, SplitCache

FOLDER = "generators"
_NAME_RE = re.compile(r"[^A-Za-z0-9._+-]+")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def record_path(out: str | Path, run_path: str) -> Path:
    """``<out>/generators/<run folder name>-<12 hex of its resolved path>.json``."""
    resolved = str(Path(run_path).expanduser().resolve())
    name = _NAME_RE.sub("_", Path(resolved).name).strip("._") or "run"
    digest = hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:12]
    return Path(out) / FOLDER / f"{name}-{digest}.json"


def extractor_identity(fc: FIDConfig) -> dict[str, Any] | None:
    """The feature extractor FID/KID would use, without loading it: the Inception weights file
    (path, size, time), or the random initialisation the fallback builds; ``None`` when there
    is none (FID/KID unavailable: nothing to reuse or store)."""
    from gen_ad.errors import GenAdError
    from gen_ad.metrics.inception import resolve_inception_weights

    try:
        path = resolve_inception_weights(fc.inception_weights)
    except GenAdError:
        if not fc.random_init_fallback:
            return None
        return {"random_init": 0, "torch": torch.__version__}
    return {"weights": file_identity(path)}


def _stain(run: Any) -> dict[str, Any] | None:
    """The run's stain normalisation as the real images get it (method, reference and its
    sha256, algorithm), or ``None``."""
    from gen_ad.data.stain import cache_settings

    stain, ref = getattr(run, "stain", None), getattr(run, "stain_ref", None)
    return cache_settings(stain, ref) if stain is not None and ref is not None else None


def fid_settings(pm: PreparedMethod, cfg: BenchmarkConfig, split: SplitCache, device: str,
                 ids: Identities, extractor: dict[str, Any]) -> dict[str, Any]:
    """``{"settings": ..., "settings_sha256": ...}``: everything a run's FID/KID depends on
    (``extractor``: :func:`extractor_identity`)."""
    from gen_ad.app.slide import scorer_identity

    fc = cfg.fid
    n_real = cfg.data.val_limit if fc.n_real is None else fc.n_real
    cls = type(pm.run)
    found = {
        "model": scorer_identity(pm.run_path, None), "sampler": f"{cls.__module__}."
        f"{cls.__qualname__}", "size": pm.size, "resize": pm.resize, "stain": _stain(pm.run),
        "n": fc.n, "n_real": n_real, "kid": fc.kid, "seed": cfg.seed,
        "sample_piece": fc.batch_size if fc.batch_size < SAMPLE_CHUNK else None,
        "extractor": extractor,
        "real": ids.listing(split.normal(cfg.data.val, pm.size, n_real, pm.resize)),
        "device": device, "deterministic": torch.are_deterministic_algorithms_enabled(),
        "code": ids.code,
    }
    plain, sha = settings_digest(found)  # as it reads back from the record
    return {"settings": plain, "settings_sha256": sha}


def finished_fid(path: Path, settings: dict[str, Any]
                 ) -> tuple[dict[str, Any] | None, str | None, str]:
    """The values and computation time recorded in ``path`` for the same settings; else
    ``None, None`` and why they are computed (again) (``""``: never computed)."""
    if not path.is_file():
        return None, None, ""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        result = rec.get("result")
        changed = settings_changed(rec, settings, "computed")
    except (OSError, ValueError, AttributeError):
        return None, None, f"its record {path} is unreadable"
    if changed:
        return None, None, changed
    if not isinstance(result, dict) or rec.get("result_sha256") != _sha256(result) \
            or result.get("status") != "ok":
        return None, None, f"its record {path} changed after it was written"
    return result, str(rec.get("computed")), ""


class FidRecords:
    """The FID/KID records of one benchmark run (``<cfg.out>/generators/``)."""

    def __init__(self, cfg: BenchmarkConfig, split: SplitCache, device: str,
                 reuse: bool) -> None:
        self.cfg, self.split, self.device, self.reuse = cfg, split, device, reuse
        self.ids = Identities()
        self.extractor = extractor_identity(cfg.fid)
        self._settings: dict[str, dict[str, Any] | None] = {}

    def settings(self, pm: PreparedMethod) -> dict[str, Any] | None:
        """:func:`fid_settings` of ``pm``'s run (``None`` without an extractor)."""
        key = str(pm.run_path)
        if key not in self._settings:
            self._settings[key] = None if self.extractor is None else fid_settings(
                pm, self.cfg, self.split, self.device, self.ids, self.extractor)
        return self._settings[key]

    def take(self, pm: PreparedMethod) -> dict[str, Any] | None:
        """The run's stored values when reusable (``reused``/``computed`` added; a stderr
        line); else ``None``, its record removed when its values are computed now (a line says
        why, unless there was none). Without an extractor nothing is computed, and a record
        is left as it is."""
        path, settings = record_path(self.cfg.out, str(pm.run_path)), self.settings(pm)
        if settings is None:
            return None
        result, computed, why = (finished_fid(path, settings) if self.reuse
                                 else (None, None, "asked not to reuse earlier results"))
        if result is not None:
            _say(f"benchmark FID/KID of {pm.run_path}: reused (computed {computed}; {path} "
                 "records the same settings)")
            return {**result, "computed": computed, "reused": True}
        if path.is_file() and why:
            _say(f"benchmark FID/KID of {pm.run_path}: computing again ({why})")
        path.unlink(missing_ok=True)
        return None

    def keep(self, pm: PreparedMethod, result: dict[str, Any]) -> dict[str, Any]:
        """Store computed values (status ``ok`` only) and return them with ``computed`` and
        ``reused`` added."""
        from gen_ad.utils.provenance import environment

        settings = self.settings(pm)
        if result.get("status") != "ok" or settings is None:
            return result
        plain = json.loads(json.dumps(result))  # as it reads back (NaN stays NaN)
        computed = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(record_path(self.cfg.out, str(pm.run_path)),
                   {"run": pm.run_path, "computed": computed, **settings, "result": plain,
                    "result_sha256": _sha256(plain), "environment": environment(self.device)})
        return {**result, "computed": computed, "reused": False}
