// Re-takes docs/dagster_lineage.png and docs/dagster_stem_metadata.png from a running webserver:
//   STEMSET_DEMO_MODELS=1 bash scripts/quickstart.sh && .venv/bin/dagster-webserver -w workspace.yaml -p 3111 &
//   (cd tests/browser && npm ci) && node docs/dagster_screenshots.mjs http://127.0.0.1:3111
import { chromium } from '../tests/browser/node_modules/playwright-core/index.mjs';

const base = process.argv[2] ?? 'http://127.0.0.1:3000';
const shots = [
  ['/asset-groups', 'docs/dagster_lineage.png', 860],
  ['/assets/stems/htdemucs/vocals?view=partitions&partition=h4n%2Fdemo_take', 'docs/dagster_stem_metadata.png', 1250],
];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--no-first-run'],
});
try {
  for (const [path, out, height] of shots) {
    const page = await browser.newPage({ viewport: { width: 1400, height } });
    await page.goto(base + path, { waitUntil: 'networkidle', timeout: 60000 });
    const skip = page.getByRole('button', { name: 'Skip' });  // the first-visit community dialog
    if (await skip.count()) await skip.first().click();
    await page.waitForTimeout(3000);
    await page.screenshot({ path: out });
    console.log('saved', out);
  }
} finally {
  await browser.close();
}
