"""Pipelines as plug-ins: a second pipeline of another package (:mod:`tests.plugins.bright`: MG
images, a bright-pixel segment, a mean-brightness score), installed by an entry point only, runs
end to end through `serve` to an SC, a SEG and an SR that pass dciodvfy and read back."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, generate_uid

from dicom_node.audit import AuditEvent
from dicom_node.config import load_settings
from dicom_node.db import DeliveryStatus, Instance, JobStatus
from dicom_node.errors import ConfigError
from dicom_node.plugins import installed_pipelines, kept_sop_classes, pipeline_plugin
from tests.conftest import dcmtk_tool, run_tool, wait_for
from tests.dicom_factory import write_cr, write_mg
from tests.plugins.bright import BrightPlugin
from tests.receiving_scp import ReceivingSCP
from tests.writers_fixtures import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, SEGMENTATION, received_results



def test_the_chest_pipeline_is_found_by_its_entry_point():
    assert "chest_xray" in installed_pipelines()
    plugin = pipeline_plugin("chest_xray")
    assert plugin.name == "chest_xray" and "1.2.840.10008.5.1.4.1.1.1" in plugin.sop_classes
    assert plugin.output.description_prefix == "AI CXR: "


def test_a_pipeline_of_another_package_is_configured_by_name(bright_installed, tmp_path):
    assert installed_pipelines() >= {"chest_xray", "bright"}
    settings = load_settings(None, state_dir=tmp_path / "state", audit={"secret": "s"},
                             pipeline={"name": "bright"}, pipelines={"bright": {"threshold": 0.2}})
    assert kept_sop_classes(settings) == {DigitalMammographyXRayImageStorageForPresentation}
    assert isinstance(pipeline_plugin("bright"), BrightPlugin)
    with pytest.raises(ConfigError, match=r"pipeline 'bright': threshold: Input should be less than or equal to 1"):
        load_settings(None, audit={"secret": "s"}, pipeline={"name": "bright"}, pipelines={"bright": {"threshold": 2}})


@pytest.mark.timeout(300)
def test_a_second_pipeline_runs_end_to_end_through_serve(bright_installed, node_factory, tmp_path):
    pacs = ReceivingSCP(folder=tmp_path / "pacs").start()
    try:
        node = node_factory({"pipeline": {"name": "bright"}, "pipelines": {"bright": {"threshold": 0.2}},
                             "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                               "port": pacs.port}]})
        node.start()
        study = str(generate_uid())
        source = write_mg(tmp_path / "mg.dcm", study)
        chest = write_cr(tmp_path / "cr.dcm", study_uid=study)  # not this pipeline's: the SCP drops it
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                        str(node.port), str(tmp_path / "mg.dcm"), str(tmp_path / "cr.dcm"))
        assert sent.returncode == 0, sent.stderr
        job = wait_for(lambda: (jobs := node.jobs(study)) and jobs[-1].status.finished and jobs[-1], 120,
                       "the MG job to finish")
        assert job.status is JobStatus.DONE, job.reason
        [instance] = node.rows(Instance)
        assert instance.verdict_reason == "mean_brightness=0.50 FLAGGED"
        wait_for(lambda: len(rows := node.deliveries(job.id)) == 3
                 and all(d.status is DeliveryStatus.DELIVERED for d in rows), 60, "SC, SEG and SR delivered")
        ignored = node.cli("audit", "list", "--event", AuditEvent.INSTANCE_IGNORED.value, "--format", "json")
        assert chest.SOPInstanceUID in ignored
    finally:
        pacs.stop()
    received = received_results(pacs.folder, pacs.stored)

    sc = received[SECONDARY_CAPTURE]
    assert sc.Modality == "MG" and sc.StudyInstanceUID == study
    assert sc.SeriesDescription == "AI BRIGHT: SUSPECTED MEAN BRIGHTNESS (0.50) [overlay]"
    bright = np.tile(np.round(np.linspace(0, 255, 128)), (128, 1)) >= 200
    pixels = sc.pixel_array
    assert pixels.shape[1:] == (128, 3) and pixels.shape[0] > 128  # the image between its text bands
    assert (pixels == (255, 160, 0)).all(axis=-1).sum() == bright.sum()  # the plug-in's renderer drew it

    seg = hd.seg.segread(pacs.folder / f"{received[SEGMENTATION].SOPInstanceUID}.dcm")
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "Bright pixels", "Mean brightness"]
    assert seg.ContentLabel == "AI_BRIGHT"
    assert seg.get_segment_description(2).anatomic_regions[0].value == "76752008"  # Breast
    masks = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=False)[0]
    np.testing.assert_array_equal(masks[..., 0] > 0.5, bright)
    np.testing.assert_array_equal(masks[..., 1] > 0.5, bright)

    sr = hd.sr.srread(pacs.folder / f"{received[COMPREHENSIVE_3D_SR].SOPInstanceUID}.dcm")
    [procedure] = [item for item in sr.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "121058"]  # Procedure reported
    assert procedure.ConceptCodeSequence[0].CodeValue == "71651007"  # Mammography
    groups = {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}
    assert list(groups) == ["bright", "mean_brightness"]
    assert groups["mean_brightness"].finding_type.value == "MEANBRIGHT"
    values = {m.name.meaning: m.value for m in groups["mean_brightness"].get_measurements()}
    assert values == {"Probability": pytest.approx(0.5, abs=0.01), "Threshold Value": pytest.approx(0.2)}
