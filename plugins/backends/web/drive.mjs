// Opens pages of a served site in headless Chromium and prints what each wrote into #results.
//
// Input (stdin, JSON): {"chromium": path, "pages": [url, ...], "timeout_ms": N, "screenshots": {url: path}}.
// Output (stdout, JSON): {"browser": version, "pages": [{"url", "status", "results", "console"}]}.
// "status" is the page's #results data-status ("done" | "error"), or "timeout" / "crashed".
import { chromium } from 'playwright-core';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString('utf8'));

const browser = await chromium.launch({
  executablePath: request.chromium,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const answer = { browser: browser.version(), pages: [] };
try {
  for (const url of request.pages) {
    const page = await browser.newPage({ viewport: { width: 900, height: 900 } });
    const console = [];
    page.on('console', (message) => { if (message.type() === 'error') console.push(message.text()); });
    page.on('pageerror', (error) => console.push(String(error)));
    const entry = { url, status: 'timeout', results: null, console };
    try {
      await page.goto(url, { waitUntil: 'load', timeout: request.timeout_ms });
      await page.waitForSelector('#results[data-status]', { state: 'attached', timeout: request.timeout_ms });
      entry.status = await page.$eval('#results', (element) => element.dataset.status);
      entry.results = JSON.parse(await page.$eval('#results', (element) => element.textContent));
      const screenshot = (request.screenshots || {})[url];
      if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
    } catch (error) {
      entry.error = String(error.message || error).split('\n')[0];
      if (page.isClosed()) entry.status = 'crashed';
    }
    answer.pages.push(entry);
    await page.close();
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(answer));
