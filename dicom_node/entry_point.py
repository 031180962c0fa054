"""Loading what another package plugs into the node: an entry point found by group and name."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from dicom_node.errors import ConfigError


def installed_names(group: str) -> set[str]:
    """Return the names installed under the entry point ``group``."""
    return set(entry_points(group=group).names)


def load_entry_point(group: str, name: str, what: str) -> Any:
    """Return the object installed as ``name`` in ``group``.

    Raises :class:`ConfigError` saying "no ``what`` is installed" with the installed names
    when there is none, or naming the entry point when it cannot be loaded.
    """
    installed = entry_points(group=group)
    if name not in installed.names:
        raise ConfigError(f"no {what} is installed (installed: "
                          f"{', '.join(sorted(installed.names)) or 'none'})")
    entry = installed[name]
    try:
        return entry.load()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{entry.value} ({what}) cannot be loaded: {type(exc).__name__}: {exc}") from exc
