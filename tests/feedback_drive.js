// Drives the feedback page in headless Chromium as a radiologist would, and prints what happened as JSON.
//
//   NODE_PATH=.cache/viewer/node_modules node feedback_drive.js URL USER PASSWORD SCREENSHOT \
//       AGREE_JOB:FINDING DISAGREE_JOB:FINDING:REASON
//
// Opens URL (expecting the login form), logs in with a wrong password (expecting a refusal), then with
// the right one; lists the jobs shown (data-job of each section, and which are flagged) and whether
// every overlay image loaded; agrees with one finding, disagrees with another giving a reason, reads the
// verdicts the page then shows, and saves a screenshot. Printed: loginShown, wrongRefused, jobs,
// flaggedJobs, overlaysLoaded, agreeShown, disagreeShown, pageErrors, consoleErrors, httpErrors.
const { chromium } = require('playwright-core');

const TIMEOUT_MS = 30000;

function row(page, job, finding) {
  return page.locator(`section[data-job="${job}"] tr[data-finding="${finding}"]`);
}

(async () => {
  const [url, user, password, screenshot, agree, disagree] = process.argv.slice(2);
  const [agreeJob, agreeFinding] = agree.split(':');
  const [disagreeJob, disagreeFinding, reason] = disagree.split(':');
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  const report = { pageErrors: [], consoleErrors: [], httpErrors: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    page.on('pageerror', error => report.pageErrors.push(String(error).slice(0, 500)));
    page.on('console', message => message.type() === 'error' && report.consoleErrors.push(message.text().slice(0, 500)));
    page.on('response', response => response.status() >= 400 && report.httpErrors.push(`${response.status()} ${response.url()}`));
    await page.goto(url);
    report.loginShown = new URL(page.url()).pathname === '/login';
    await page.fill('input[name=user]', user);
    await page.fill('input[name=password]', password + '-wrong');
    await page.click('button[type=submit]');
    report.wrongRefused = await page.locator('.error').innerText().catch(() => '');
    report.httpErrors = [];  // the refusal answers 401 on purpose, which Chromium logs
    report.consoleErrors = [];
    await page.fill('input[name=user]', user);
    await page.fill('input[name=password]', password);
    await page.click('button[type=submit]');
    await page.locator('section.job').first().waitFor();
    report.jobs = await page.locator('section.job').evaluateAll(s => s.map(e => Number(e.dataset.job)));
    report.flaggedJobs = await page.locator('section.job.flagged').evaluateAll(s => s.map(e => Number(e.dataset.job)));
    report.overlaysLoaded = await page.waitForFunction(() => {
      const images = [...document.images];
      return images.length > 0 && images.every(i => i.complete) && images.every(i => i.naturalWidth > 0);
    }).then(() => true, () => false);
    await row(page, agreeJob, agreeFinding).locator('button[value=agree]').click();
    await page.waitForLoadState();
    await row(page, disagreeJob, disagreeFinding).locator('input[name=reason]').fill(reason);
    await row(page, disagreeJob, disagreeFinding).locator('button[value=disagree]').click();
    await page.waitForLoadState();
    report.agreeShown = await row(page, agreeJob, agreeFinding).locator('.verdict').innerText();
    report.disagreeShown = await row(page, disagreeJob, disagreeFinding).locator('.verdict').innerText();
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: screenshot });
    await context.close();
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(report));
})().catch(error => { console.error(error); process.exit(1); });
