"""Routing rules: which pipelines analyse a received instance, and where their results go.

Rules are tried in their order in ``routes``; the first whose conditions all hold takes
the instance. A rule's conditions are any of: the calling AE, the modality, the body part
examined, the SOP class, and tag conditions (equals one of, matches a regular expression,
present or absent). A condition lists the values it accepts; a rule without conditions
takes everything. A rule names its pipelines (none: kept, not analysed), its
destinations (absent: every destination) and, optionally, the series a study it takes is
complete with (``expected_series``, each a set of conditions as above; see
:mod:`dicom_node.scheduler`) and whether it runs in shadow mode (``shadow``: its results are
written and kept, their deliveries held, nothing sent until ``dicom-node jobs release``; see
docs/shadow-mode.md).

The default: with no ``routes`` configured, every instance goes to ``pipeline.name`` and
its results to every destination (the route ``default``). With routes configured, an
instance no rule takes is kept and not analysed: the job records it as skipped, "no
routing rule takes it". ``dicom-node rules test FILE`` shows which rule a file takes and why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID_dictionary

if TYPE_CHECKING:
    from dicom_node.config import Destination, Settings

DEFAULT_ROUTE = "default"
#: A pipeline's configured name: also the name of its results' folder.
PIPELINE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
NO_ROUTE_REASON = "no routing rule takes it"
#: UID keywords (``ComputedRadiographyImageStorage``) to UIDs, for ``sop_class`` conditions.
SOP_CLASS_KEYWORDS = {keyword: uid for uid, (*_, keyword) in UID_dictionary.items() if keyword}


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _tag_of(text: str) -> BaseTag:
    """Return the tag named by a keyword (``BodyPartExamined``) or a number (``(0018,0015)``,
    ``00180015``); raises ValueError for anything else."""
    tag = tag_for_keyword(text)
    if tag is not None:
        return Tag(tag)
    digits = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", text.strip())
    if digits is None:
        raise ValueError(f"{text!r} is neither a DICOM keyword nor a tag like (0018,0015)")
    return Tag(int(digits[1], 16), int(digits[2], 16))


def _values(dataset: Dataset, tag: BaseTag) -> list[str] | None:
    """Return the element's values as stripped strings; None when it is absent or empty."""
    element = dataset.get(tag)
    if element is None or element.value in (None, "", b""):
        return None
    value = element.value
    return [str(v).strip() for v in value] if isinstance(value, MultiValue) else [str(value).strip()]


class TagCondition(_Rules):
    """One tag's condition: its value ``equals`` one of a list (case-insensitive), ``matches`` a
    regular expression (whole value), or is ``present`` (true) or absent (false)."""

    tag: str
    equals: list[str] | None = None
    matches: str | None = None
    present: bool | None = None

    @field_validator("tag")
    @classmethod
    def _known_tag(cls, value: str) -> str:
        _tag_of(value)
        return value

    @field_validator("matches")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _one_test(self) -> TagCondition:
        tests = [test for test in (self.equals, self.matches, self.present) if test is not None]
        if len(tests) != 1:
            raise ValueError(f"tag condition on {self.tag} needs exactly one of equals, matches, present")
        return self

    def check(self, dataset: Dataset) -> tuple[bool, str]:
        """Return whether ``dataset`` meets it, and a line saying why."""
        values = _values(dataset, _tag_of(self.tag))
        shown = "absent" if values is None else "\\".join(values)
        if self.present is not None:
            return (values is not None) == self.present, f"{self.tag} {'present' if self.present else 'absent'}: {shown}"
        if self.equals is not None:
            wanted = {v.strip().upper() for v in self.equals}
            met = values is not None and any(v.upper() in wanted for v in values)
            return met, f"{self.tag} {shown} in {self.equals}"
        met = values is not None and any(re.fullmatch(self.matches or "", v) for v in values)
        return met, f"{self.tag} {shown} matches {self.matches!r}"


class Conditions(_Rules):
    """What a rule asks of an instance; every condition given must hold (none given: all do)."""

    calling_ae: list[str] = Field(default_factory=list)
    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    sop_class: list[str] = Field(default_factory=list, description="UIDs or their keywords")
    tags: list[TagCondition] = Field(default_factory=list)

    @field_validator("sop_class")
    @classmethod
    def _uids(cls, values: list[str]) -> list[str]:
        uids = [SOP_CLASS_KEYWORDS.get(v.strip(), v.strip()) for v in values]
        unknown = [v for v, uid in zip(values, uids, strict=True) if uid not in UID_dictionary]
        if unknown:
            raise ValueError(f"unknown SOP class(es): {', '.join(unknown)} (give a UID or its keyword)")
        return uids

    def check(self, dataset: Dataset, calling_ae: str) -> list[tuple[bool, str]]:
        """Return each condition's outcome on ``dataset`` sent by ``calling_ae``, with why."""
        checks = []
        for name, wanted, actual in (
                ("calling AE", self.calling_ae, calling_ae),
                ("modality", self.modality, dataset.get("Modality")),
                ("body part", self.body_part, dataset.get("BodyPartExamined")),
                ("SOP class", self.sop_class, dataset.get("SOPClassUID"))):
            if wanted:
                value = str(actual or "").strip()
                met = value.upper() in {w.strip().upper() for w in wanted}
                checks.append((met, f"{name} {value or '(none)'} in {wanted}"))
        checks.extend(condition.check(dataset) for condition in self.tags)
        return checks


class Route(_Rules):
    """One routing rule: its name, conditions, pipelines and destinations."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    when: Conditions = Field(default_factory=Conditions)
    pipelines: list[Annotated[str, Field(pattern=PIPELINE_NAME)]] = Field(
        description="pipelines that analyse what it takes; [] keeps it unanalysed")
    destinations: list[str] | None = Field(None, description="where the results go; default: every destination")
    expected_series: list[Conditions] = Field(
        default_factory=list, description="a study it takes is complete once, for each of these, a series "
        "meeting it has arrived; none: on its association's release or the quiet period")
    shadow: bool = Field(False, description="analyse and keep the results, send nothing until "
                         "`dicom-node jobs release`")

    @field_validator("name")
    @classmethod
    def _not_default(cls, value: str) -> str:
        if value == DEFAULT_ROUTE:
            raise ValueError(f"'{DEFAULT_ROUTE}' names the route used when no routes are configured")
        return value


@dataclass(frozen=True)
class RouteDecision:
    """The route an instance takes: its name, pipelines, destinations, and whether their results
    are held (shadow mode)."""

    route: str
    pipelines: tuple[str, ...]
    destinations: tuple[Destination, ...]
    shadow: bool = False


@dataclass(frozen=True)
class RuleCheck:
    """One rule tried on an instance: whether it took it, and each condition's line."""

    route: str
    taken: bool
    lines: tuple[str, ...]


class Router:
    """Decides each instance's route from the configured rules (or the default route)."""

    def __init__(self, routes: Sequence[Route], default_pipeline: str,
                 destinations: Sequence[Destination]) -> None:
        self.routes = list(routes)
        self.default_pipeline = default_pipeline
        self.destinations = list(destinations)

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        return cls(settings.routes, settings.pipeline.name, settings.destinations)

    def pipeline_names(self) -> list[str]:
        """Return the names of the pipelines any route runs, in order of first mention."""
        names = [self.default_pipeline] if not self.routes else [n for r in self.routes for n in r.pipelines]
        return list(dict.fromkeys(names))

    def explain(self, dataset: Dataset, calling_ae: str) -> list[RuleCheck]:
        """Return the rules tried on ``dataset`` in order, up to and including the one that takes it."""
        if not self.routes:
            return [RuleCheck(DEFAULT_ROUTE, True, ("no routes configured: the default route",))]
        tried = []
        for route in self.routes:
            checks = route.when.check(dataset, calling_ae)
            taken = all(met for met, _ in checks)
            tried.append(RuleCheck(route.name, taken, tuple(
                f"{'yes' if met else 'no '}  {line}" for met, line in checks) or ("no conditions: takes all",)))
            if taken:
                break
        return tried

    def route(self, dataset: Dataset, calling_ae: str) -> RouteDecision | None:
        """Return the route ``dataset`` sent by ``calling_ae`` takes; None when no rule takes it."""
        taken = next((check.route for check in self.explain(dataset, calling_ae) if check.taken), None)
        if taken is None:
            return None
        if taken == DEFAULT_ROUTE:
            return RouteDecision(DEFAULT_ROUTE, (self.default_pipeline,), tuple(self.destinations))
        route = next(r for r in self.routes if r.name == taken)
        wanted = None if route.destinations is None else set(route.destinations)
        return RouteDecision(route.name, tuple(route.pipelines),
                             tuple(d for d in self.destinations if wanted is None or d.name in wanted),
                             route.shadow)


    def expects_series(self) -> bool:
        """Return whether any route completes its studies by their expected series."""
        return any(route.expected_series for route in self.routes)

    def expected_series_arrived(self, arrived: Sequence[tuple[Dataset, str]]) -> bool:
        """Return whether the route the first of ``arrived`` (data sets with their calling AEs, one
        study's) takes expects series, and a data set of ``arrived`` meets each of them."""
        if not arrived:
            return False
        decision = self.route(*arrived[0])
        route = next((r for r in self.routes if decision is not None and r.name == decision.route), None)
        if route is None or not route.expected_series:
            return False
        return all(any(all(met for met, _ in expected.check(dataset, calling_ae)) for dataset, calling_ae in arrived)
                   for expected in route.expected_series)


def check_references(routes: Sequence[Route], destinations: Sequence[Any]) -> list[str]:
    """Return a problem line for each route naming a destination that is not configured, and
    for each route name used twice."""
    known = {d.name for d in destinations}
    problems = [f"routes.{route.name}: destination '{name}' is not configured (destinations: "
                f"{', '.join(sorted(known)) or 'none'})"
                for route in routes for name in route.destinations or () if name not in known]
    names = [route.name for route in routes]
    problems += [f"routes: the name '{name}' is used more than once"
                 for name in sorted({n for n in names if names.count(n) > 1})]
    return problems
