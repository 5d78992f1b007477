// Five rapid clicks on the reference page in a real Firefox, driven over WebDriver BiDi by
// puppeteer-core (the system's firefox-esr, launched by path: no browser download).
// Usage: node clicks.mjs FIREFOX URL CLICKS GAP_MS
// Prints one JSON line: {"shown", "clicks", "painted", "version"} as the page recorded them.
import puppeteer from 'puppeteer-core';

const [executablePath, url, clicks, gapMs] = process.argv.slice(2);
const browser = await puppeteer.launch({browser: 'firefox', executablePath, headless: true});
try {
  const page = await browser.newPage();
  await page.goto(url);
  const started = performance.now();
  for (let chat = 1; chat <= Number(clicks); chat++) {
    const pause = started + (chat - 1) * Number(gapMs) - performance.now();
    if (pause > 0) await new Promise((resolve) => setTimeout(resolve, pause));  // the user's pace
    await page.click(`#chat-${chat}`);
  }
  await page.waitForFunction(`window.painted && window.painted.chat === ${Number(clicks)}`, {timeout: 60_000});
  const shown = await page.$eval('#view', (view) => view.dataset.chat);
  const [recorded, painted] = await page.evaluate(() => [window.clicks, window.painted]);
  console.log(JSON.stringify({shown, clicks: recorded, painted, version: await browser.version()}));
} finally {
  await browser.close();
}
