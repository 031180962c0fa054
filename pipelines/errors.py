"""Exceptions raised by analysis pipelines."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error a pipeline raises on purpose."""


class InputError(PipelineError, ValueError):
    """An image or data set that cannot be analysed (undecodable, wrong shape, ...)."""


class SkippedByGate(InputError):
    """A data set the quality gate's tag check skipped; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"skipped: {reason}")
        self.reason = reason


class WeightsError(PipelineError):
    """A weights manifest or weights file that is missing, malformed or altered."""
