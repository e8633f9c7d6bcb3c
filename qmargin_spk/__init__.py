"""qmargin_spk: speaker-verification recipes with the Q-Margin family of sparse alpha-divergence losses."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(distribution: str = "qmargin_spk") -> str:
    """The version of the installed distribution (its metadata, e.g. ``0.2.0``); ``"unknown"`` when not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


__version__ = installed_version()
