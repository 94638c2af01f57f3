// Drives the Stemset page in Debian's headless Chromium: upload a take, wait for its job, check
// the player lists every stem with a waveform, start playback, save a screenshot.
// Env: STEMSET_URL, STEMSET_TOKEN (optional), AUDIO_FILE, SCREENSHOT, CHROMIUM (default /usr/bin/chromium),
// JOB_TIMEOUT_MS. Prints one JSON line with what it saw; exits non-zero on any failure.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const url = process.env.STEMSET_URL;
const token = process.env.STEMSET_TOKEN || "";
const audio = process.env.AUDIO_FILE;
const shot = process.env.SCREENSHOT;
const jobTimeout = Number(process.env.JOB_TIMEOUT_MS || 180000);
const profileDir = mkdtempSync(join(tmpdir(), "stemset-chromium-"));

const context = await chromium.launchPersistentContext(profileDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"],
  viewport: { width: 1100, height: 900 },
});
const errors = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.addInitScript((t) => { if (t) localStorage.setItem("stemset-token", t); }, token);
  await page.goto(url, { waitUntil: "load" });
  await page.waitForSelector("#profile option", { state: "attached", timeout: 15000 });

  await page.setInputFiles("#file", audio);
  await page.click("#upload-button");
  const seenStatuses = new Set();
  const deadline = Date.now() + jobTimeout;
  let status = "";
  while (Date.now() < deadline) {
    status = (await page.getAttribute("#job", "data-status")) || "";
    if (status) seenStatuses.add(status);
    if (status === "complete" || status === "error") break;
    await page.waitForTimeout(200);
  }
  if (status !== "complete") {
    throw new Error(`job ended ${status || "never"}: ${await page.textContent("#job-error")}`);
  }
  await page.waitForSelector("#player[data-state=ready]", { timeout: 30000 });
  const stems = await page.$$eval("#stems .stem", (rows) => rows.map((r) => r.dataset.stem));
  // every waveform has drawn pixels
  const drawn = await page.$$eval("#stems canvas.wave", (cs) => cs.map((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  }));
  const listed = await page.$$eval("#recordings tbody tr", (rows) => rows.map((r) => r.dataset.partition));

  await page.click("#play");
  await page.waitForFunction(() => window.stemsetPlayer.ctx && window.stemsetPlayer.ctx.state === "running",
    null, { timeout: 10000 });
  const t0 = await page.evaluate(() => window.stemsetPlayer.ctx.currentTime);
  await page.waitForFunction(() => window.stemsetPlayer.position() > 0.25, null, { timeout: 10000 });
  const playback = await page.evaluate(() => ({
    state: window.stemsetPlayer.ctx.state, currentTime: window.stemsetPlayer.ctx.currentTime,
    position: window.stemsetPlayer.position(), playerState: document.querySelector("#player").dataset.state,
  }));
  // solo the first stem: every other stem is silent; mute it: all silent
  const first = stems[0];
  await page.click(`.stem[data-stem="${first}"] button.solo`);
  const soloGains = await page.evaluate(() => window.stemsetPlayer.stems.map((s) => [s.name, s.gain.gain.value]));
  await page.click(`.stem[data-stem="${first}"] button.solo`);
  await page.click(`.stem[data-stem="${first}"] button.mute`);
  const muteGains = await page.evaluate(() => window.stemsetPlayer.stems.map((s) => [s.name, s.gain.gain.value]));
  await page.click(`.stem[data-stem="${first}"] button.mute`);
  await page.waitForTimeout(300); // a little more of the playhead in the picture
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify({ ok: true, statuses: [...seenStatuses], stems, drawn, listed, t0, playback,
                               soloGains, muteGains, errors }));
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err), errors }));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profileDir, { recursive: true, force: true });
}
