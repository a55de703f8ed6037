// Drives the ws2http chat demo page in Debian's headless Chromium with playwright-core:
// two tabs join under different names, one sends a message, the other must show it,
// and the reply goes back the other way. Then the API drops one of them from the room
// while its socket stays open: its next message is refused with "reconnect", and the
// page must reconnect, send that message again and go on chatting. Dropped again, it sends
// two messages at once, and both must arrive, once each and in order. Saves a screenshot
// of each tab.
//
//   WS2HTTP_API_TOKEN=<the gateway's --api-token> node tests/browser/demo.mjs <page url> <screenshot.png>
//
// Exit code 0 when every check passed; otherwise the failure is printed and it is 1.
// CHROMIUM overrides the browser path (default /usr/bin/chromium). The page's server is
// the PHP example, which is also the API: the script sends it the gateway's DELETE.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [pageUrl, shotPath] = process.argv.slice(2);
const apiToken = process.env.WS2HTTP_API_TOKEN;
if (!pageUrl || !shotPath || !apiToken) {
  console.error('usage: WS2HTTP_API_TOKEN=<token> node demo.mjs <page url> <screenshot.png>');
  process.exit(2);
}

const TIMEOUT = 15000;
const profile = mkdtempSync(join(tmpdir(), 'ws2http-chromium-'));
const problems = [];
let context;

function log(...args) {
  console.log('[demo.mjs]', ...args);
}

async function openTab(name) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('pageerror', (err) => problems.push(`${name}: page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`${name}: console error: ${msg.text()}`);
  });
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  await page.goto(pageUrl);
  await page.fill('#name', name);
  const login = page.waitForResponse((res) => new URL(res.url()).pathname === '/auth/login');
  await page.click('#join');
  const { clientId } = await (await login).json();
  await page.waitForSelector('#status[data-state="connected"]');
  log(`${name} connected`);
  return { page, clientId, sockets };
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function expectMessage(page, kind, from, text) {
  const sel = `#messages li.msg.${kind}`;
  await page.waitForFunction(
    ({ sel, from, text }) =>
      Array.from(document.querySelectorAll(sel)).some(
        (li) => li.dataset.from === from && li.querySelector('.text')?.textContent === text,
      ),
    { sel, from, text },
    { timeout: TIMEOUT },
  );
}

// `from` (named `name`) says `text`: it shows as theirs on their page and as another's on
// `to`'s.
async function say(from, name, to, text) {
  await send(from, text);
  await expectMessage(from, 'mine', name, text);
  await expectMessage(to, 'other', name, text);
}

// The API drops Alice from the room while her socket stays open, as it does when a push for
// her finds no socket (after a cluster node came back, pushes go to a node that does not
// hold hers). Here through the API's own DELETE call, the gateway's token and no
// X-Connection-Id: that removes her row whichever connection it names. `watcher` must see
// her leave.
async function dropFromRoom(tab, name, watcher, reason) {
  const dropped = await fetch(new URL('/' + tab.clientId, pageUrl), {
    method: 'DELETE',
    headers: { 'X-Ws2http-Token': apiToken },
    body: reason,
  });
  if (dropped.status !== 200) throw new Error(`DELETE of ${name}: ${dropped.status} ${await dropped.text()}`);
  await watcher.waitForFunction(
    (line) => Array.from(document.querySelectorAll('#messages li.system')).some((li) => li.textContent === line),
    `${name} left (${reason})`,
  );
}

// The texts of the messages from `from` of this `kind` that `page` shows, in order.
async function textsFrom(page, kind, from) {
  return page.$$eval(
    `#messages li.msg.${kind}`,
    (lis, from) => lis.filter((li) => li.dataset.from === from).map((li) => li.querySelector('.text').textContent),
    from,
  );
}

try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 900, height: 640 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });

  const aliceTab = await openTab('Alice');
  const bobTab = await openTab('Bob');
  const alice = aliceTab.page;
  const bob = bobTab.page;

  // Alice hears that Bob joined, and Bob's member list has Alice.
  await alice.waitForFunction(() =>
    Array.from(document.querySelectorAll('#messages li.system')).some((li) => li.textContent === 'Bob joined'),
  );
  await bob.waitForFunction(() => document.querySelector('#members').textContent.includes('Alice'));

  const hello = 'Hello Bob, this is Alice. Ça va ?';
  await say(alice, 'Alice', bob, hello);
  log('Bob got Alice\'s message');

  const reply = 'Hi Alice! Bob here, loud and clear.';
  await say(bob, 'Bob', alice, reply);
  log('Alice got Bob\'s reply');

  // Nothing of one's own comes back as someone else's message.
  const echoed = await alice.$$eval('#messages li.msg.other', (lis) => lis.filter((li) => li.dataset.from === 'Alice').length);
  if (echoed !== 0) problems.push(`Alice saw her own message as another's ${echoed} time(s)`);

  await dropFromRoom(aliceTab, 'Alice', bob, 'dropped by the test');
  // Her next message is refused ("not in the chat: reconnect"): the page reconnects, which
  // joins her again, and sends it again; then both ways work as before.
  const refused = 'Alice here again, after the room dropped me.';
  await say(alice, 'Alice', bob, refused);
  log('Alice reconnected and her refused message reached Bob');
  const after = 'And this one goes straight through.';
  await say(alice, 'Alice', bob, after);
  const back = 'Welcome back, Alice.';
  await say(bob, 'Bob', alice, back);
  if (aliceTab.sockets.length !== 2) {
    problems.push(`Alice's page opened ${aliceTab.sockets.length} websockets, not 2 (one reconnect)`);
  }
  log('Alice and Bob chat again');

  // Dropped again, Alice sends two messages at once (both leave before any answer). The
  // refusal of the first makes the page close its socket; the refusal of the second then
  // never reaches the page (the gateway drops answers to a socket the client closed). Both
  // must reach Bob after the reconnect, once each and in order, and show once as hers: a
  // message sent after them (on the new socket) comes after any copy of them, so once it is
  // there the counts are final.
  await dropFromRoom(aliceTab, 'Alice', bob, 'dropped again by the test');
  const quick = ['First of two quick ones.', 'Second of two quick ones.'];
  await alice.evaluate((texts) => {
    for (const text of texts) {
      document.getElementById('text').value = text;
      document.getElementById('say-form').requestSubmit();
    }
  }, quick);
  for (const text of quick) {
    await expectMessage(bob, 'other', 'Alice', text).catch((err) => {
      throw new Error(`Bob never got "${text}" from the dropped Alice: ${err.message}`);
    });
  }
  const last = 'Nothing came twice before this one.';
  await say(alice, 'Alice', bob, last);
  const want = JSON.stringify([hello, refused, after, ...quick, last]);
  const atBob = JSON.stringify(await textsFrom(bob, 'other', 'Alice'));
  if (atBob !== want) problems.push(`Bob got from Alice ${atBob}, not ${want}`);
  const atAlice = JSON.stringify(await textsFrom(alice, 'mine', 'Alice'));
  if (atAlice !== want) problems.push(`Alice's page shows as hers ${atAlice}, not ${want}`);
  if (aliceTab.sockets.length !== 3) {
    problems.push(`Alice's page opened ${aliceTab.sockets.length} websockets, not 3 (two reconnects)`);
  }
  log('both quick messages of the dropped Alice reached Bob, once each and in order');

  // A ?ws= naming another host is ignored: the login token would go there.
  const tricked = new URL(pageUrl);
  const elsewhere = tricked.searchParams.get('ws').replace('127.0.0.1', 'localhost');
  tricked.searchParams.set('ws', elsewhere);
  const mallory = await context.newPage();
  const opened = [];
  mallory.on('websocket', (ws) => opened.push(ws.url()));
  await mallory.goto(tricked.toString());
  await mallory.fill('#name', 'Mallory');
  // The page logs in, then opens its websocket: wait for that (not for a fixed time, which a
  // loaded machine can overrun), then a little for any second one.
  const first = mallory.waitForEvent('websocket', { timeout: TIMEOUT }).catch(() => null);
  await mallory.click('#join');
  await first;
  await mallory.waitForTimeout(300);
  const shown = await mallory.textContent('#ws-url');
  if (shown.startsWith(elsewhere.replace(/\/$/, ''))) problems.push(`the page took ?ws=${elsewhere}`);
  const leaked = opened.filter((url) => url.startsWith(elsewhere.replace(/\/$/, '')));
  if (leaked.length) problems.push(`a websocket (with the token) went to another host: ${leaked.join(', ')}`);
  if (!opened.length) problems.push('the page with a foreign ?ws= opened no websocket at all');
  log(`with a foreign ?ws=, websockets opened to: ${opened.join(', ')}`);
  await mallory.close();

  await bob.screenshot({ path: shotPath });
  await alice.screenshot({ path: shotPath.replace(/\.png$/, '-alice.png') });
  log(`screenshots: ${shotPath}`);
} catch (err) {
  problems.push(String(err && err.stack ? err.stack : err));
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

if (problems.length) {
  console.error('[demo.mjs] FAILED:\n' + problems.join('\n'));
  process.exit(1);
}
log('all checks passed');
