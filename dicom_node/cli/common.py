"""What every command shares: loading the settings once, turning node errors into CLI messages."""

from __future__ import annotations

import functools
import getpass
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dicom_node.config import Settings, load_settings
from dicom_node.errors import NodeError
from dicom_node.private_state import tighten

F = TypeVar("F", bound=Callable[..., Any])


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """Return the effective settings for this invocation, with ``overrides`` from flags; an
    existing state folder and its databases are made private first (see :func:`tighten`).

    Raises ``click.ClickException`` naming the bad key when the configuration is invalid.
    """
    try:
        settings = load_settings(ctx.find_root().params.get("config"), **overrides)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.getLogger().setLevel(settings.log_level)
    tighten(settings)
    return settings


def os_user() -> str:
    """Return the OS user running the command, the actor of what it audits."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def expand_paths(paths: tuple[Path, ...]) -> list[Path]:
    """Return the files named and the files under the folders named, each folder sorted."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def node_errors_as_click(function: F) -> F:
    """Turn a :class:`NodeError` raised by ``function`` into a ``ClickException``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NodeError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
