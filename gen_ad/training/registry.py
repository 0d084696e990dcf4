"""The family registry: every :class:`~gen_ad.training.family.Family` subclass decorated with
:func:`~gen_ad.training.family.register_family` next to its definition is a family.

The built-in families (``wgan``, ``stylegan2``, ``ddpm``) are imported here so that they register;
a family defined anywhere else (a plug-in, a test) registers when its module is imported. There is
no table to edit and no private dict to patch.
"""

from __future__ import annotations

import difflib

from gen_ad.errors import ConfigError
from gen_ad.training.family import Family


def _builtin() -> None:
    """Import the built-in families (their decorators register them)."""
    from gen_ad.training import ddpm, stylegan2, wgan  # noqa: F401


def registered() -> dict[str, type[Family]]:
    """``{name: class}`` of every registered family, built-ins first.

    Raises:
        ConfigError: two registered families share a name.
    """
    _builtin()
    out: dict[str, type[Family]] = {}
    todo = list(Family.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if not cls.__dict__.get("_registered", False):
            continue
        if cls.name in out and out[cls.name] is not cls:
            raise ConfigError(f"two model families are registered as '{cls.name}': "
                              f"{out[cls.name].__module__} and {cls.__module__}")
        out[cls.name] = cls
    return out


def family_class(name: str) -> type[Family]:
    """The :class:`~gen_ad.training.family.Family` subclass of a family name."""
    found = registered()
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown model family '{name}'{hint} (known: {', '.join(found)})")
    return found[name]


def family_schema(name: str) -> type:
    """The top-level config schema of a training family."""
    return family_class(name).config_cls


def families() -> list[str]:
    """Names of the registered training families."""
    return list(registered())
