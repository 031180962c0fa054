"""The pipelines the node runs: plug-ins found by entry point (see :mod:`pipelines.base`).

The chest X-ray pipeline declares itself in dicom-node's ``pyproject.toml``; another
package adds one the same way::

    [project.entry-points."dicom_node.pipelines"]
    chest_xray = "pipelines.chest_xray.plugin:ChestXrayPlugin"

The routes (:mod:`dicom_node.routing`) choose which run; with none, ``pipeline.name`` does
(default ``chest_xray``). A pipeline's options are ``pipelines.<name>`` (the chest's also
default to ``gate`` and ``pipeline.manifest``); ``pipelines.<name>.plugin`` runs another
installed plug-in under that name, so one plug-in may run twice with other options.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dicom_node.entry_point import installed_names, load_entry_point
from dicom_node.errors import ConfigError, WeightsCheckError
from dicom_node.routing import Router
from pipelines.base import GROUP, Pipeline, PipelineOptions, PipelinePlugin, Runtime
from pipelines.errors import WeightsError

if TYPE_CHECKING:
    from dicom_node.config import Settings

logger = logging.getLogger(__name__)


def installed_pipelines() -> set[str]:
    """Return the names of the installed pipeline plug-ins."""
    return installed_names(GROUP)


def pipeline_plugin(name: str, settings: Settings | None = None) -> PipelinePlugin:
    """Return the plug-in configured as ``name``: the one installed under ``pipelines.<name>.plugin``
    of ``settings`` when set (so that one plug-in runs under several names, each with its own
    options), else the one installed as ``name``; it answers to ``name``.

    Raises :class:`ConfigError` naming it and the installed ones when none is installed
    under that name, or naming its entry point when it cannot be loaded.
    """
    own = (settings.pipelines.get(name) or {}) if settings is not None else {}
    installed_as = str(own.get("plugin") or name)
    plugin_class = load_entry_point(GROUP, installed_as, f"pipeline '{installed_as}'")
    try:
        plugin = plugin_class()
    except TypeError as exc:
        raise ConfigError(f"the pipeline '{installed_as}' cannot be made: {type(exc).__name__}: {exc}") from exc
    if not isinstance(plugin, PipelinePlugin):
        raise ConfigError(f"the pipeline '{installed_as}' is not a pipelines.base.PipelinePlugin")
    plugin.name = name
    return plugin


def configured_plugin(name: str, settings: Settings) -> PipelinePlugin:
    """Return the plug-in configured as ``name``, configured with its options; raises ConfigError."""
    plugin = pipeline_plugin(name, settings)
    try:
        plugin.configure(plugin_options(plugin, settings))
    except WeightsError as exc:
        raise ConfigError(f"the pipeline '{name}': {exc}") from exc
    return plugin


def configured_plugins(settings: Settings) -> list[PipelinePlugin]:
    """Return the plug-ins of the pipelines the routes run (with no routes, ``pipeline.name``),
    each configured with its options; raises ConfigError."""
    return [configured_plugin(name, settings) for name in Router.from_settings(settings).pipeline_names()]


def plugin_options(plugin: PipelinePlugin, settings: Settings) -> PipelineOptions:
    """Return ``plugin``'s options from ``settings``; raises :class:`ConfigError` naming what is invalid."""
    try:
        return plugin.options(settings.model_dump())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc']) or '(options)'}: {error['msg']}"
                             for error in exc.errors())
        raise ConfigError(f"invalid options of the pipeline '{plugin.name}': {problems}") from exc


def kept_sop_classes(settings: Settings) -> frozenset[str]:
    """Return the SOP classes the SCP keeps: those of every configured pipeline."""
    return frozenset().union(*(plugin.sop_classes for plugin in configured_plugins(settings)))


def verify_weights(settings: Settings) -> None:
    """Check every weights file of the configured pipelines against its recorded digest.

    Raises :class:`WeightsCheckError` naming a missing or altered file, so that ``serve``
    refuses to start rather than run a worker that cannot.
    """
    for plugin in configured_plugins(settings):
        try:
            plugin.verify_weights(plugin_options(plugin, settings))
        except WeightsError as exc:
            raise WeightsCheckError(str(exc)) from exc


def build_pipeline(settings: Settings, name: str | None = None, *, device: str | None = None,
                   manifest: Path | None = None) -> tuple[PipelinePlugin, Pipeline]:
    """Return the plug-in configured as ``name`` (default ``pipeline.name``) and its pipeline,
    weights loaded, on ``device`` (default ``worker.device``) with the weights manifest
    ``manifest`` when given.

    Raises :class:`ConfigError`, or :class:`pipelines.errors.WeightsError` when a weights file is bad.
    """
    plugin = configured_plugin(name or settings.pipeline.name, settings)
    options = plugin_options(plugin, settings)
    if manifest is not None:
        options = options.model_copy(update={"manifest": manifest})
    runtime = Runtime(device=device or settings.worker.device, max_megapixels=settings.scp.max_image_megapixels)
    pipeline = plugin.build(options, runtime)
    logger.info("Pipeline %s %s", plugin.name, pipeline.version)
    return plugin, pipeline


def build_pipelines(settings: Settings) -> dict[str, tuple[PipelinePlugin, Pipeline]]:
    """Return every pipeline the routes run, by its configured name (see :func:`build_pipeline`)."""
    return {name: build_pipeline(settings, name) for name in Router.from_settings(settings).pipeline_names()}
