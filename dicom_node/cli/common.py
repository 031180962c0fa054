"""What every command shares: loading the settings once, turning node errors into CLI messages."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from dicom_node.config import Settings, load_settings
from dicom_node.errors import NodeError

F = TypeVar("F", bound=Callable[..., Any])


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """Return the effective settings for this invocation, with ``overrides`` from flags.

    Raises ``click.ClickException`` naming the bad key when the configuration is invalid.
    """
    try:
        settings = load_settings(ctx.find_root().params.get("config"), **overrides)
    except NodeError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.getLogger().setLevel(settings.log_level)
    return settings


def node_errors_as_click(function: F) -> F:
    """Turn a :class:`NodeError` raised by ``function`` into a ``ClickException``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NodeError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
