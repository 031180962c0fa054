// Opens each of the node's objects in OHIF with headless Chromium and prints what the viewer did, as JSON.
//
//   NODE_PATH=.cache/viewer/node_modules node drive.js VIEWER_URL STUDY_UID OUT_DIR KIND=SERIES_NUMBER...
//
// KIND is sc, seg or sr. For each, a fresh browser context opens /viewer?StudyInstanceUIDs=STUDY_UID,
// waits for the first image, double-clicks the series' thumbnail, answers "Yes" to the viewer's prompt
// (open the SEG, track the SR's measurements) and writes OUT_DIR/KIND.png. Printed per kind:
// pageErrors, consoleErrors, httpErrors (responses >= 400); for seg, segmentsListed (row titles of the
// segmentation panel) and segmentsDrawn (labelmap segments shown in the viewport); for sr,
// groupsListed (labels of the measurement groups OHIF read from the SR), groupsDrawn (annotations its
// SR viewport drew) and groupsTracked (measurements in OHIF's measurement service once tracked).
const { chromium } = require('playwright-core');

const TIMEOUT_MS = 60000;
const SETTLE_MS = 5000;

// What the SEG's segments look like in the viewer: the segmentation panel's rows, the segments drawn.
async function segmentation(page) {
  await page.click('[data-cy="panelSegmentation-btn"]');
  await page.waitForTimeout(SETTLE_MS);
  return {
    segmentsListed: await page.locator('[data-cy="data-row-title"]').allInnerTexts(),
    segmentsDrawn: await page.evaluate(() => {
      const { segmentationService, viewportGridService } = window.services;
      return segmentationService.getSegmentationRepresentations(viewportGridService.getActiveViewportId())
        .filter(representation => representation.visible)
        .flatMap(representation => Object.values(representation.segments || {}).filter(segment => segment.visible)).length;
    }),
  };
}

// The SR's measurement groups as OHIF read them, and the annotations its SR viewport drew.
function srGroups() {
  const sr = window.services.displaySetService.getActiveDisplaySets().find(set => set.Modality === 'SR');
  return {
    groupsListed: (sr?.measurements || []).map(m => m.label || m.TrackingIdentifier || ''),
    groupsDrawn: window.cornerstoneTools.annotation.state.getAllAnnotations()
      .filter(annotation => annotation.metadata.toolName === 'DICOMSRDisplay').length,
  };
}

async function open(browser, url, kind, series, outDir) {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
  const page = await context.newPage();
  const report = { pageErrors: [], consoleErrors: [], httpErrors: [] };
  page.on('pageerror', error => report.pageErrors.push(String(error.stack || error).slice(0, 1000)));
  page.on('console', message => message.type() === 'error' && report.consoleErrors.push(message.text().slice(0, 1000)));
  page.on('response', response => response.status() >= 400 && report.httpErrors.push(`${response.status()} ${response.url()}`));
  await page.goto(url);
  const thumbnail = page.locator(`[data-cy^="study-browser-thumbnail"][data-series="${series}"]`);
  await thumbnail.waitFor({ timeout: TIMEOUT_MS });
  await page.waitForFunction(() => window.cornerstone?.getEnabledElements().some(e => e.viewport.getImageData?.()),
    null, { timeout: TIMEOUT_MS });  // the first image is drawn: the hanging protocol is done
  await thumbnail.dblclick();
  if (kind !== 'sc') {  // "open this Segmentation?" / "continue tracking measurements?"
    const yes = page.getByRole('button', { name: 'Yes' });
    const prompted = await yes.waitFor({ timeout: TIMEOUT_MS }).then(() => true, () => false);
    if (kind === 'sr') Object.assign(report, await page.evaluate(srGroups));
    if (prompted) await yes.click();
    else report.consoleErrors.push('the viewer did not prompt');
  }
  if (kind === 'seg') Object.assign(report, await segmentation(page));
  await page.waitForTimeout(SETTLE_MS);
  if (kind === 'sr') {
    report.groupsTracked = await page.evaluate(
      () => window.services.measurementService.getMeasurements().map(m => m.label || m.toolName));
  }
  report.screenshot = `${outDir}/${kind}.png`;
  await page.screenshot({ path: report.screenshot });
  await context.close();
  return report;
}

(async () => {
  const [viewer, study, outDir, ...objects] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  const reports = {};
  try {
    for (const object of objects) {
      const [kind, series] = object.split('=');
      reports[kind] = await open(browser, `${viewer}/viewer?StudyInstanceUIDs=${study}`, kind, series, outDir)
        .catch(error => ({ failed: String(error).slice(0, 1000) }));
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(reports, null, 2));
})();
