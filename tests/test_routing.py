"""Routing rules: the first rule an instance meets decides which pipelines analyse it and where their
results go; `dicom-node rules test` says which rule a file takes and why; end to end through `serve`
with two pipelines, two destinations and an instance no rule takes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation as MammographyImage, generate_uid

from dicom_node.audit import AuditEvent
from dicom_node.cli import main
from dicom_node.config import load_settings
from dicom_node.db import DeliveryStatus, Instance, JobStatus
from dicom_node.errors import ConfigError
from dicom_node.plugins import kept_sop_classes
from dicom_node.routing import NO_ROUTE_REASON, Router
from pipelines.chest_xray.plugin import ChestXrayPlugin
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import make_cr, write_cr, write_mg, write_rg1_study
from tests.receiving_scp import ReceivingSCP

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DESTINATIONS = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112},
                {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11113}]
ROUTES = [
    {"name": "from-ward", "when": {"calling_ae": ["WARD"], "modality": ["CR", "DX"],
                                   "tags": [{"tag": "ViewPosition", "equals": ["PA", "AP"]}]},
     "pipelines": ["chest_xray"], "destinations": ["pacs"]},
    {"name": "research", "when": {"tags": [{"tag": "(0008,1030)", "matches": "RESEARCH.*"},
                                           {"tag": "InstitutionName", "present": False}]},
     "pipelines": [], "destinations": []},
    {"name": "any-chest", "when": {"body_part": ["chest"], "sop_class": ["ComputedRadiographyImageStorage"]},
     "pipelines": ["chest_xray"]},
]


def router(routes=ROUTES) -> Router:
    return Router.from_settings(load_settings(None, audit={"secret": "s"}, destinations=DESTINATIONS, routes=routes))


def test_the_first_rule_an_instance_meets_takes_it():
    chest = make_cr()
    taken = router().route(chest, "WARD")
    assert (taken.route, taken.pipelines, [d.name for d in taken.destinations]) == (
        "from-ward", ("chest_xray",), ["pacs"])
    # Another sender: the ward's rule does not hold; the last rule takes it, to every destination.
    taken = router().route(chest, "OTHER")
    assert (taken.route, [d.name for d in taken.destinations]) == ("any-chest", ["pacs", "archive"])
    # An AP view from the ward is the ward's; a lateral view is not.
    chest.ViewPosition = "AP"
    assert router().route(chest, "WARD").route == "from-ward"
    chest.ViewPosition = "LL"
    assert router().route(chest, "WARD").route == "any-chest"


def test_tag_conditions_match_present_and_absent():
    research = make_cr()
    research.StudyDescription = "RESEARCH COHORT 7"
    assert router().route(research, "OTHER").route == "research"
    research.InstitutionName = "General"  # present: the research rule's "absent" fails
    assert router().route(research, "OTHER").route == "any-chest"
    research.StudyDescription = "Thorax"  # matches is the whole value
    del research.InstitutionName
    assert router().route(research, "OTHER").route == "any-chest"


def test_no_rule_taking_an_instance_and_the_default_route():
    foot = make_cr(body_part="FOOT")
    assert router().route(foot, "OTHER") is None
    [*_, last] = router().explain(foot, "OTHER")
    assert (last.route, last.taken, last.lines) == ("any-chest", False, (
        "no   body part FOOT in ['chest']", "yes  SOP class 1.2.840.10008.5.1.4.1.1.1 in ['1.2.840.10008.5.1.4.1.1.1']"))
    default = router([]).route(foot, "OTHER")  # no routes: pipeline.name, every destination
    assert (default.route, default.pipelines, len(default.destinations)) == ("default", ("chest_xray",), 2)


@pytest.mark.parametrize(("routes", "message"), [
    ([{"name": "a", "pipelines": ["chest_xray"], "destinations": ["nowhere"]}],
     "routes.a: destination 'nowhere' is not configured"),
    ([{"name": "a", "pipelines": ["chest_xray"]}, {"name": "a", "pipelines": []}],
     "the name 'a' is used more than once"),
    ([{"name": "a", "pipelines": ["bone_age"]}], "pipeline 'bone_age'"),
    ([{"name": "a", "pipelines": ["../x"]}], "String should match pattern"),
    ([{"name": "default", "pipelines": []}], "'default' names the route used when no routes are configured"),
    ([{"name": "a", "pipelines": [], "when": {"tags": [{"tag": "NoSuchKeyword", "equals": ["x"]}]}}],
     "'NoSuchKeyword' is neither a DICOM keyword nor a tag"),
    ([{"name": "a", "pipelines": [], "when": {"tags": [{"tag": "Modality", "matches": "("}]}}],
     "not a regular expression"),
    ([{"name": "a", "pipelines": [], "when": {"tags": [{"tag": "Modality", "equals": ["CR"], "present": True}]}}],
     "needs exactly one of equals, matches, present"),
    ([{"name": "a", "pipelines": [], "when": {"sop_class": ["NotAStorageClass"]}}], "unknown SOP class"),
    ([{"name": "a", "pipelines": [], "when": {"modallity": ["CR"]}}], "Extra inputs are not permitted"),
])
def test_bad_rules_are_refused_naming_what_is_wrong(routes, message):
    with pytest.raises(ConfigError, match="invalid configuration") as raised:
        load_settings(None, audit={"secret": "s"}, destinations=DESTINATIONS, routes=routes)
    assert message in str(raised.value)


def test_rules_test_prints_the_rule_a_file_takes_and_why(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"audit": {"secret": "s"}, "destinations": DESTINATIONS, "routes": ROUTES}))
    chest, foot = write_cr(tmp_path / "chest.dcm"), write_cr(tmp_path / "foot.dcm", body_part="FOOT")
    runner = CliRunner()
    done = runner.invoke(main, ["--config", str(config), "rules", "test", "--calling-ae", "WARD",
                                str(tmp_path / "chest.dcm")])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        f"{tmp_path / 'chest.dcm'} (SOP Instance {chest.SOPInstanceUID}, calling AE WARD)",
        "  rule from-ward: taken",
        "    yes  calling AE WARD in ['WARD']",
        "    yes  modality CR in ['CR', 'DX']",
        "    yes  ViewPosition PA in ['PA', 'AP']",
        "  => route from-ward: pipelines chest_xray; destinations pacs",
    ]
    done = runner.invoke(main, ["--config", str(config), "rules", "test", str(tmp_path / "foot.dcm")])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        f"{tmp_path / 'foot.dcm'} (SOP Instance {foot.SOPInstanceUID}, calling AE (none))",
        "  rule from-ward: not taken",
        "    no   calling AE (none) in ['WARD']",
        "    yes  modality CR in ['CR', 'DX']",
        "    yes  ViewPosition PA in ['PA', 'AP']",
        "  rule research: not taken",
        "    no   (0008,1030) absent matches 'RESEARCH.*'",
        "    yes  InstitutionName absent: absent",
        "  rule any-chest: not taken",
        "    no   body part FOOT in ['chest']",
        "    yes  SOP class 1.2.840.10008.5.1.4.1.1.1 in ['1.2.840.10008.5.1.4.1.1.1']",
        f"  => {NO_ROUTE_REASON}: kept, not analysed",
    ]
    (tmp_path / "junk.dcm").write_bytes(b"not DICOM")
    refused = runner.invoke(main, ["--config", str(config), "rules", "test", str(tmp_path / "junk.dcm")])
    assert refused.exit_code == 1 and "junk.dcm is not a readable DICOM file" in refused.output


@pytest.mark.timeout(300)
def test_routes_choose_pipelines_and_destinations_through_serve(bright_installed, node_factory, tmp_path):
    """MG images to the test pipeline `bright` and the breast archive only; the ward's chest images to
    both pipelines and the chest PACS only; another sender's chest image taken by no rule: kept, skipped."""
    chest_pacs = ReceivingSCP("CHESTPACS", folder=tmp_path / "chest-pacs").start()
    archive = ReceivingSCP("ARCHIVE", folder=tmp_path / "archive").start()
    try:
        node = node_factory({
            "scp": {"allowed_peers": [{"ae_title": "STORESCU"}, {"ae_title": "WARD"}]},
            "destinations": [{"name": "chest-pacs", "ae_title": "CHESTPACS", "host": "127.0.0.1", "port": chest_pacs.port},
                             {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}],
            "routes": [{"name": "mammo", "when": {"modality": ["MG"]}, "pipelines": ["bright"],
                        "destinations": ["archive"]},
                       {"name": "ward-chest", "when": {"calling_ae": ["WARD"], "body_part": ["CHEST"]},
                        "pipelines": ["chest_xray", "bright"], "destinations": ["chest-pacs"]}],
            "pipelines": {"bright": {"threshold": 0.2}}})
        node.start()
        mg_study, ward_study, other_study = (str(generate_uid()) for _ in range(3))
        write_mg(tmp_path / "mg.dcm", mg_study)
        ward = write_rg1_study(tmp_path / "ward.dcm", StudyInstanceUID=ward_study)
        write_rg1_study(tmp_path / "other.dcm", StudyInstanceUID=other_study)
        for calling, files in (("STORESCU", ["mg.dcm", "other.dcm"]), ("WARD", ["ward.dcm"])):
            sent = run_tool(dcmtk_tool("storescu"), "-aet", calling, "-aec", "DICOM_NODE", "127.0.0.1",
                            str(node.port), *(str(tmp_path / f) for f in files))
            assert sent.returncode == 0, sent.stderr
        assert kept_sop_classes(load_settings(node.config)) == {  # the SCP keeps both pipelines' images
            MammographyImage, *ChestXrayPlugin.sop_classes}

        jobs = {study: wait_for(lambda s=study: (js := node.jobs(s)) and js[-1].status.finished and js[-1], 240,
                                f"the job of {study} to finish") for study in (mg_study, ward_study, other_study)}
        assert jobs[mg_study].status is JobStatus.DONE, jobs[mg_study].reason
        assert jobs[ward_study].status is JobStatus.DONE, jobs[ward_study].reason
        assert (jobs[other_study].status, jobs[other_study].reason) == (JobStatus.SKIPPED, NO_ROUTE_REASON)
        [ward_instance] = node.rows(Instance, Instance.sop_instance_uid == ward.SOPInstanceUID)
        assert ward_instance.verdict_reason.startswith("chest_xray: analysed: covid19=")
        assert ward_instance.verdict_reason.endswith(" | bright: skipped: modality is not MG")
        results = node.state_dir / "results" / ward_study / ward.SOPInstanceUID
        assert sorted(p.name for p in results.iterdir()) == ["chest_xray"]
        for job in (jobs[mg_study], jobs[ward_study]):
            wait_for(lambda j=job: len(rows := node.deliveries(j.id)) == 3
                     and all(d.status is DeliveryStatus.DELIVERED for d in rows), 60, "SC, SEG and SR delivered")
        skipped = json.loads(node.cli("audit", "list", "--event", AuditEvent.JOB_SKIPPED.value, "--format", "json"))
        assert [(e["study_uid"], e["detail"]) for e in skipped] == [(other_study, NO_ROUTE_REASON)]
        told = node.cli("rules", "test", "--calling-ae", "WARD", str(tmp_path / "ward.dcm"))
        assert told.splitlines()[-1] == "  => route ward-chest: pipelines chest_xray, bright; destinations chest-pacs"
    finally:
        chest_pacs.stop()
        archive.stop()
    assert len(archive.stored) == 3 and len(chest_pacs.stored) == 3
    descriptions = {}
    for scp in (archive, chest_pacs):
        [sc_uid] = [uid for uid, sop_class in scp.stored.items() if sop_class == SECONDARY_CAPTURE]
        descriptions[scp.ae_title] = str(dcmread(scp.folder / f"{sc_uid}.dcm").SeriesDescription)
    assert descriptions["ARCHIVE"].startswith("AI BRIGHT: ") and descriptions["CHESTPACS"].startswith("AI CXR: ")
