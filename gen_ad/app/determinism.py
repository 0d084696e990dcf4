"""``GEN_AD_DETERMINISTIC=1``: deterministic mode for every command (the CLI enters it around
each command; :mod:`gen_ad.utils.determinism` holds the mode itself)."""

from __future__ import annotations

from gen_ad.utils.determinism import deterministic_from_environment

__all__ = ["deterministic_from_environment"]
