"""Typed configuration: dataclass schemas, YAML files and ``key.sub=value`` overrides.

Every config is a tree of dataclasses. :func:`from_dict` builds one from plain data and fails,
before any work, with a :class:`~gen_ad.errors.ConfigError` that names the offending key: an
unknown key (with the closest valid key), a wrong type, or an impossible value (checked by each
dataclass's ``validate``). :func:`to_dict` / :func:`save_config` give back the resolved config.

Values: a float must be finite (``inf``/``nan`` are refused everywhere). A text field never takes
an empty (or blank) string: a required one rejects it, and so does an optional (``str | None``)
one (``''`` is *not* read as unset: leave the key out or write ``null``); only a field whose
default is ``''`` (where ``''`` already means "not given") accepts it. In a YAML file, a
``Literal`` field whose choices hold ``no``/``off``/``yes``/``on`` takes the boolean YAML 1.1
makes of them (``mixed_precision: no``) as that choice; a duplicate key in one mapping is an error.

Family schemas (``wgan``, ``stylegan2``, ``ddpm``) live beside their trainers in
``gen_ad/training/<family>.py`` (so each family is one place) and are found through the family
registry (:mod:`gen_ad.training.registry`); the common sections every training config has are
defined here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar, Union

import yaml

from gen_ad.errors import ConfigError
from gen_ad.utils.io import write_text
from gen_ad.utils.paths import REPO_ROOT

T = TypeVar("T")

def check(cond: bool, key: str, msg: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass
class DataConfig:
    """Where the normal training patches come from and how they are prepared.

    Attributes:
        train: folder of patches (class subfolders such as ``normal/``, or images directly).
        val: optional folder of normal validation patches (threshold calibration, FID reference).
        size: side length in pixels that every patch is resized/cropped to.
        normal_classes: class subfolder names that count as normal.
        resize: ``resize`` (whole patch to size) or ``center_crop`` (crop; resize only if
            smaller).
        max_bad_fraction: fraction of unreadable files above which loading fails.
        stain_norm: ``none``, ``macenko`` or ``reinhard`` (fitted on ``stain_ref``).
        stain_ref: reference image for stain normalisation.
        subset: use only this many patches (seeded choice); ``None`` uses all.
        synthetic: generate this many synthetic normal patches when ``train`` is ``synthetic``.
        num_workers: data-loader worker processes.
        cache: folder for a decoded uint8 cache of ``train``/``val`` (memory-mapped, built once,
            keyed by the folder's content and these settings; :mod:`gen_ad.data.cache`);
            ``None`` decodes the image files at every read.
    """

    train: str = "synthetic"
    val: str | None = None
    size: int = 64
    normal_classes: list[str] = field(default_factory=lambda: ["normal"])
    resize: Literal["resize", "center_crop"] = "resize"
    max_bad_fraction: float = 0.05
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    stain_ref: str | None = None
    subset: int | None = None
    synthetic: int = 512
    num_workers: int = 0
    cache: str | None = None

    def validate(self, prefix: str) -> None:
        check(self.size >= 8, f"{prefix}.size", f"must be >= 8, got {self.size}")
        check(0.0 <= self.max_bad_fraction <= 1.0, f"{prefix}.max_bad_fraction",
              f"must be in [0, 1], got {self.max_bad_fraction}")
        check(self.stain_norm == "none" or self.stain_ref is not None, f"{prefix}.stain_ref",
              f"is required when stain_norm is '{self.stain_norm}'")
        check(self.subset is None or self.subset > 0, f"{prefix}.subset", "must be positive")
        check(self.synthetic > 0, f"{prefix}.synthetic", "must be positive")
        check(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        check(len(self.normal_classes) > 0, f"{prefix}.normal_classes", "must not be empty")


@dataclass
class TrainConfig:
    """Settings of the shared training loop (see :mod:`gen_ad.training.loop`).

    Attributes:
        batch_size: global batch size (split over processes).
        max_steps: stop after this many optimisation steps.
        max_kimg: optionally stop after this many thousand training images as well.
        max_minutes: optionally stop (with a checkpoint) once this invocation has trained this
            many wall-clock minutes; a later ``--resume`` continues exactly. Learning-rate
            schedules still follow ``max_steps``.
        seed: seed of every random draw (data order, noise, initialisation).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (GPU only; CPU runs in fp32).
        grad_accum: micro-batches per step; must divide the per-process batch (``batch_size``
            / processes), checked when training starts.
        log_every / sample_every / ckpt_every / fid_every: intervals in steps (0 = never).
        keep_last: number of training states kept in ``state/``.
        fid_n: generated (and at most real) images per periodic FID/KID.
        fid_weights: Inception weights file (else the torch hub cache; offline without: skipped).
        ema_decay: EMA decay of the EMA'd models (0 disables EMA).
        ema_warmup: use ``min(decay, (1 + step) / (10 + step))`` early in training.
        cpu: force CPU even when CUDA is present.
        deterministic: deterministic mode for this run (:mod:`gen_ad.utils.determinism`):
            deterministic torch algorithms (an operation that has none is an error naming
            it), cuDNN without autotuning, a deterministic cuBLAS workspace; the same config,
            seed, libraries and GPU then repeat bitwise on CUDA too (CPU runs repeat without
            it, at the same thread count). Slower on CUDA. The environment variable
            ``GEN_AD_DETERMINISTIC=1`` turns it on as well (either suffices); which was on is
            recorded per start in ``environment.jsonl`` and in the export's ``model.json``.
    """

    batch_size: int = 32
    max_steps: int = 1000
    max_kimg: float | None = None
    max_minutes: float | None = None
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum: int = 1
    log_every: int = 10
    sample_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    fid_every: int = 0
    fid_n: int = 1000
    fid_weights: str | None = None
    ema_decay: float = 0.999
    ema_warmup: bool = True
    cpu: bool = False
    deterministic: bool = False

    def validate(self, prefix: str) -> None:
        for k in ("batch_size", "max_steps", "grad_accum", "keep_last", "fid_n"):
            v = getattr(self, k)
            check(v > 0, f"{prefix}.{k}", f"must be positive, got {v}")
        for k in ("log_every", "sample_every", "ckpt_every", "fid_every"):
            check(getattr(self, k) >= 0, f"{prefix}.{k}", "must be >= 0 (0 = never)")
        check(self.seed >= 0, f"{prefix}.seed", f"must be >= 0, got {self.seed}")
        check(self.batch_size % self.grad_accum == 0, f"{prefix}.grad_accum",
              f"must divide batch_size ({self.batch_size})")
        check(0.0 <= self.ema_decay < 1.0, f"{prefix}.ema_decay", "must be in [0, 1)")
        check(self.max_kimg is None or self.max_kimg > 0, f"{prefix}.max_kimg", "must be positive")
        check(self.max_minutes is None or self.max_minutes > 0, f"{prefix}.max_minutes",
              "must be positive")


# ----------------------------------------------------------------------------- machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, args, key)
    if origin is Literal:
        value = _literal_from_bool(value, args)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}': must be one of {choices}, got {value!r}")
        return value
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, tp: Any, args: tuple[Any, ...], key: str) -> Any:
    """``value`` as the first member of the union ``tp`` (members ``args``) it fits."""
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error names the deepest bad key
        if options[0] is str and _is_blank(value):
            raise ConfigError(f"config key '{key}': must not be empty, got {value!r} "
                              "(leave the key out or write null to leave it unset)")
        return _coerce(value, options[0], key)
    for a in options:
        try:
            return _coerce(value, a, key)
        except ConfigError:
            continue
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked as a float (ints widen), int, bool or str."""
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            number = _float_or_none(value)
            if number is not None:
                return _finite(number, value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return _finite(float(value), value, key)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        return _text(value, key)
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


# YAML 1.1 spellings of the booleans (what PyYAML's safe loader turns into True/False).
_YAML_BOOL_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


def _literal_from_bool(value: Any, choices: tuple[Any, ...]) -> Any:
    """The one string choice that YAML 1.1 read as the boolean ``value`` (``no`` -> False)."""
    if not isinstance(value, bool):
        return value
    words = _YAML_BOOL_WORDS[value]
    spelled = [c for c in choices if isinstance(c, str) and c.lower() in words]
    return spelled[0] if len(spelled) == 1 else value


def _is_blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _finite(number: float, value: Any, key: str) -> float:
    if not math.isfinite(number):
        raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
    return number


def _text(value: Any, key: str) -> str:
    """A non-empty string; YAML scalars that are not text get a hint to quote them."""
    if isinstance(value, (bool, int, float)):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r} (YAML read "
                          "the value as a number or boolean; quote it to mean text)")
    if not isinstance(value, (str, Path)):
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if _is_blank(value):
        raise ConfigError(f"config key '{key}': must not be empty, got {value!r}")
    return str(value)


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(names)})")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k in data:
        if k not in names:
            raise _unknown_key(cls, str(k), prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for k, v in data.items():
        base = _section_default(fields[k])
        if base is not None and isinstance(v, Mapping):
            v = _merge(base, v)  # a partial section keeps the schema's defaults for that section
        if isinstance(v, str) and v == "" and fields[k].default == "":  # its own "not given"
            kwargs[k] = v
            continue
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    obj = cls(**kwargs)
    return obj


def _section_default(f: dataclasses.Field[Any]) -> dict[str, Any] | None:
    """The default of a section field as plain data (``None`` for non-section fields)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) \
            else v
    return out


def _validate_tree(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            _validate_tree(v, f"{prefix}.{f.name}" if prefix else f.name)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix or "<root>")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build and validate a config of schema ``cls`` from plain data.

    Args:
        cls: a dataclass schema.
        data: nested mapping (e.g. parsed YAML); missing keys take their defaults.
        prefix: key prefix in error messages (e.g. ``scorer`` for scorer options).
    Returns:
        The validated config.
    Raises:
        ConfigError: unknown key, wrong type or impossible value (the message names the key).
    """
    obj = _build(cls, data or {}, prefix)
    _validate_tree(obj, prefix)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested data (what :func:`from_dict` takes back)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value``; the value is YAML (``3``, ``1e-4``, ``true``, ``[a, b]``).

    A list element is addressed by its index, ``methods.0.kwargs.steps`` or
    ``methods[0].kwargs.steps`` (both give the parts ``methods``, ``0``, ``kwargs``, ``steps``).
    The value here is schema-free YAML; :func:`apply_overrides` with a ``schema`` keeps the raw
    text for text fields instead.
    """
    parts, raw = _split_override(text)
    return parts, _yaml_value(raw)


def _split_override(text: str) -> tuple[list[str], str]:
    """``key.sub=value`` -> (key parts, raw value text); ``[i]`` becomes the part ``i``."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    if "[" in key or "]" in key:
        raise ConfigError(f"override '{text}': a list index is written [0] or .0 (a number)")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), raw


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _override_value(raw: str, tp: Any) -> Any:
    """The value of an override for a field annotated ``tp`` (``None``: unknown, plain YAML).

    Text fields (``str``, a ``Literal`` of strings, optionally ``| None``) take the raw text, so
    YAML cannot re-type it (``no`` stays ``no``, ``2024`` stays ``2024``); ``null``/``~`` are
    still ``None`` (unsetting an optional field; a required one reports it), and a quoted value
    (``'null'``) is the text inside the quotes.
    """
    if tp is None or not _is_text_type(tp):
        return _yaml_value(raw)
    text = raw.strip()
    if text in _YAML_NULLS:
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        unquoted = _yaml_value(text)
        return unquoted if isinstance(unquoted, str) else text
    return text


def _is_text_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        return all(_is_text_type(a) for a in options)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp in (str, Path)


def _without_none(tp: Any) -> Any:
    """``X`` for ``X | None``; ``tp`` itself otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _annotation_at(schema: Any, parts: Sequence[str]) -> Any:
    """The annotation of the key ``parts`` in ``schema`` (``None`` when not known)."""
    tp = schema
    for part in parts:
        tp = _without_none(tp)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif origin in (list, Sequence, tuple) and part.isdigit():
            tp = args[0] if args else Any
        elif origin in (dict, Mapping):
            tp = args[1] if len(args) == 2 else Any
        else:
            return None
        if tp is None or tp is Any:
            return None
    return tp


def _default_at(schema: Any, parts: Sequence[str]) -> Any:
    """The schema's default value at ``parts`` as plain data (``None`` when there is none)."""
    try:
        node: Any = schema()
    except TypeError:  # not a dataclass, or one with required fields
        return None
    for part in parts:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = getattr(node, part, None)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if isinstance(node, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in node]
    return None


def _key_name(parts: Sequence[str]) -> str:
    """``['methods', '0', 'kwargs']`` -> ``methods[0].kwargs`` (as errors name keys)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out


def _slot(node: dict[str, Any] | list[Any], part: str, path: Sequence[str]) -> Any:
    """The key of ``part`` in ``node``: itself for a mapping, a checked index for a list."""
    if not isinstance(node, list):
        return part
    name = _key_name(path)
    if not part.isdigit():
        raise ConfigError(f"config key '{name}': is a list; address an element by its index "
                          f"({name}[0] or {name}.0), got '{part}'")
    if int(part) >= len(node):
        raise ConfigError(f"config key '{name}[{part}]': index out of range; '{name}' has "
                          f"{len(node)} element(s) (indices 0 to {len(node) - 1})")
    return int(part)


def _container(node: dict[str, Any] | list[Any], parts: Sequence[str], depth: int,
               schema: Any) -> dict[str, Any] | list[Any]:
    """The mapping or list at ``parts[: depth + 1]`` below ``node``, made when missing."""
    path, nxt = parts[: depth + 1], parts[depth + 1]
    slot = _slot(node, parts[depth], parts[:depth])
    child = node[slot] if isinstance(node, list) else node.get(slot)
    if isinstance(child, (dict, list)):
        return child
    tp = _annotation_at(schema, path) if schema is not None else None
    if nxt.isdigit() and typing.get_origin(_without_none(tp)) in (list, Sequence, tuple):
        child = _default_at(schema, path)
        if child is None:
            raise ConfigError(f"config key '{_key_name(path)}': has no list to index here; "
                              f"set the whole list ({_key_name(path)}=[...])")
    else:
        child = {}
    node[slot] = child
    return child


def apply_overrides(data: dict[str, Any], overrides: Sequence[str],
                    schema: Any = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set.

    Args:
        data: the config data (e.g. a parsed YAML file); not modified.
        overrides: ``key.sub=value`` texts; ``key.0.sub`` / ``key[0].sub`` address an element
            of an existing list (of ``data``, else of the schema's default).
        schema: the dataclass schema, if known: text fields then take the raw text (see
            :func:`_override_value`); without it every value is YAML.
    Raises:
        ConfigError: a malformed override, or a list index out of range (naming the key).
    """
    out: dict[str, Any] = _deepcopy(data)
    for text in overrides:
        parts, raw = _split_override(text)
        tp = _annotation_at(schema, parts) if schema is not None else None
        node: dict[str, Any] | list[Any] = out
        for depth in range(len(parts) - 1):
            node = _container(node, parts, depth, schema)
        node[_slot(node, parts[-1], parts[:-1])] = _override_value(raw, tp)
    return out


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key repeated in one mapping is an error (not: last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, line, seen[key])
                seen[key] = line
            except TypeError:  # unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` (a clear error when missing, not a mapping, or with a
    key repeated in one mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from e
    except _DuplicateKeyError as e:
        raise ConfigError(f"config file {p}: {e}; each key may appear once per mapping") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line, column)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


# ----------------------------------------------------------------------------- built-in configs
# The repository's configs/ folder ships inside the package as gen_ad/configs/ (pyproject.toml),
# so an installed gen_ad has the same configs as a source checkout.


def builtin_config_dir() -> Path:
    """The folder of the built-in configs: ``gen_ad/configs/`` of an installed package, else
    the source checkout's ``configs/`` (an editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else REPO_ROOT / "configs"


def builtin_configs() -> dict[str, Path]:
    """Every built-in config by name, ``<folder>/<stem>`` (``ddpm/demo``), sorted by name."""
    root = builtin_config_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p
            for p in sorted(root.glob("*/*.yaml"))}


def builtin_config_name(text: str | Path) -> str | None:
    """The built-in name a relative path or name spells (``configs/ddpm/demo.yaml``,
    ``ddpm/demo.yaml`` or ``ddpm/demo`` -> ``ddpm/demo``), else ``None`` (an absolute path,
    ``..``, or not two parts)."""
    p = PurePosixPath(str(text).replace("\\", "/"))
    parts = list(p.parts)
    if p.is_absolute() or ".." in parts:
        return None
    if len(parts) == 3 and parts[0] == "configs":
        parts = parts[1:]
    if len(parts) != 2:
        return None
    stem = parts[1].removesuffix(".yaml").removesuffix(".yml")
    return f"{parts[0]}/{stem}"


def builtin_config(name: str | Path) -> Path:
    """The file of a built-in config named as :func:`builtin_config_name` reads it; a
    :class:`ConfigError` naming the closest built-in names when there is none."""
    known = builtin_configs()
    key = builtin_config_name(name)
    if key is not None and key in known:
        return known[key]
    close = difflib.get_close_matches(key or str(name), list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"no built-in config '{name}'{hint} (`gen-ad configs list` lists them)")


def resolve_config_file(path: str | Path) -> Path:
    """``path`` when it is a file; else the built-in config it names (a relative path such as
    the README's ``configs/ddpm/demo.yaml`` from a folder without it, or ``ddpm/demo``), with a
    warning saying which file is used; else a :class:`ConfigError`."""
    p = Path(path)
    if p.is_file():
        return p
    key = builtin_config_name(path)
    found = builtin_configs().get(key) if key is not None else None
    if found is None:
        raise ConfigError(f"config file not found: {p}{_builtin_hint(key)}")
    if p.suffix.lower() in (".yaml", ".yml"):  # a file path, not a name: say what is used
        warnings.warn(f"config {path}: no such file here, using the built-in config {key} "
                      f"({found}; `gen-ad configs copy {key}` makes an editable copy)",
                      stacklevel=2)
    return found


def _builtin_hint(key: str | None) -> str:
    """The end of a missing-config message for a path shaped like a built-in name (``key``):
    the closest built-in names, or where they are listed; ``""`` for other paths."""
    if key is None:
        return ""
    close = difflib.get_close_matches(key, list(builtin_configs()), n=3)
    if close:
        return f" (nor a built-in config; did you mean {', '.join(close)}?)"
    return " (nor a built-in config: `gen-ad configs list` lists them)"


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Load ``path`` (optional; a missing relative path may name a built-in config, see
    :func:`resolve_config_file`), apply overrides, and validate against schema ``cls``."""
    data = read_yaml(resolve_config_file(path)) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides, schema=cls))


def save_config(cfg: Any, path: str | Path) -> None:
    """Atomically write the resolved config as YAML."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
