// ws2http chat demo: plain JS, no build step.
//
// 1. POST /auth/login {name} to the PHP API -> a ClientId it chose, and a signed token.
// 2. Open a websocket to the gateway: <ws base><clientId>?token=<token>. ws2http asks the
//    API (GET /<clientId>?token=…) whether to accept it.
// 3. Messages typed here go to the API (POST /<clientId>); the API pushes them to the
//    other members through the gateway's control API, and replies to us.
//
// The websocket base URL is ?ws=ws://host:port/ on this page's URL, or else
// ws://<this page's host name>:7001/ (wss:// when the page is https). A ?ws= naming
// another host than this page's is ignored: the login token goes to that URL, and a
// link could otherwise send it anywhere.
'use strict';

(function () {
  const params = new URLSearchParams(location.search);
  function onThisHost(url) {
    try {
      const parsed = new URL(url);
      return (parsed.protocol === 'ws:' || parsed.protocol === 'wss:') && parsed.hostname === location.hostname;
    } catch (e) {
      return false;
    }
  }
  const wsBase = (function () {
    let base = params.get('ws');
    if (base && !onThisHost(base)) {
      console.warn('ignoring ?ws=' + base + ': not a ws:// or wss:// URL on ' + location.hostname);
      base = null;
    }
    if (!base) {
      const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const host = location.hostname.includes(':') ? '[' + location.hostname + ']' : location.hostname;
      base = scheme + '//' + host + ':7001/';
    }
    return base.endsWith('/') ? base : base + '/';
  })();

  const $ = (id) => document.getElementById(id);
  const statusEl = $('status');
  const messagesEl = $('messages');
  const members = new Set();
  let session = null; // {clientId, name, token}
  let socket = null;
  let retries = 0;
  // Every text sent and not answered yet, oldest first, as {id, text}: the API's answer to a
  // say carries its id back ("sent", or an "error"). Those still here when a new socket opens
  // are sent again, in order: the API refused them because it had dropped us from the room,
  // or the old socket closed before their answer came (then one may have reached the room
  // already and shows twice there; not sending it again could lose it). Past MAX_PENDING
  // the page takes no new text: it stays in the box.
  const pending = [];
  const MAX_PENDING = 100;
  let lastId = 0;

  $('ws-url').textContent = wsBase;

  function setStatus(state, text) {
    statusEl.className = 'status ' + state;
    statusEl.dataset.state = state;
    statusEl.textContent = text;
  }

  function timeOf(unixSeconds) {
    const d = unixSeconds ? new Date(unixSeconds * 1000) : new Date();
    return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  function addMessage(kind, from, text, time) {
    const li = document.createElement('li');
    li.className = 'msg ' + kind;
    if (kind === 'system') {
      li.textContent = text;
    } else {
      const meta = document.createElement('div');
      meta.className = 'meta';
      meta.textContent = (kind === 'mine' ? 'you' : from) + ' · ' + timeOf(time);
      const body = document.createElement('div');
      body.className = 'text';
      body.textContent = text;
      li.dataset.from = from;
      li.append(meta, body);
    }
    messagesEl.append(li);
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  function showMembers() {
    $('members').textContent = members.size ? Array.from(members).sort().join(', ') : 'nobody else yet';
  }

  function onEvent(ev) {
    switch (ev.type) {
      case 'members':
        members.clear();
        ev.members.forEach((m) => members.add(m));
        showMembers();
        break;
      case 'joined':
        members.add(ev.name);
        showMembers();
        addMessage('system', '', ev.name + ' joined');
        break;
      case 'left':
        members.delete(ev.name);
        showMembers();
        addMessage('system', '', ev.name + ' left' + (ev.reason ? ' (' + ev.reason + ')' : ''));
        break;
      case 'message':
        addMessage('other', ev.from, ev.text, ev.time);
        break;
      case 'sent':
        answered(ev.id);
        addMessage('mine', session.name, ev.text, ev.time);
        break;
      case 'error':
        if (ev.reconnect) {
          rejoin();
        } else {
          answered(ev.id);
          addMessage('system', '', 'error: ' + ev.text);
        }
        break;
      default:
        addMessage('system', '', 'unknown event: ' + JSON.stringify(ev));
    }
  }

  // The API no longer counts us in the room although this socket is open (after a cluster
  // node came back, its pushes for us went to a node that does not hold this socket, and it
  // dropped us). Only a new connection joins again: close this one, and onclose reconnects.
  // The refused text stays pending, and so do those sent after it, whose refusals this
  // socket will not read: the new socket sends them all again.
  function rejoin() {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    addMessage('system', '', 'no longer in the chat: reconnecting');
    socket.close(4000, 'rejoin');
  }

  function sendSay(msg) {
    socket.send(JSON.stringify({ type: 'say', id: msg.id, text: msg.text }));
  }

  // The API answered the say with this id: it is no longer pending.
  function answered(id) {
    const i = pending.findIndex((msg) => msg.id === id);
    if (i >= 0) pending.splice(i, 1);
  }

  function connect() {
    const url = wsBase + encodeURIComponent(session.clientId) + '?token=' + encodeURIComponent(session.token);
    setStatus('connecting', 'connecting…');
    socket = new WebSocket(url);
    let opened = false;
    socket.onopen = () => {
      opened = true;
      retries = 0;
      setStatus('connected', 'connected');
      socket.send(JSON.stringify({ type: 'who' }));
      for (const msg of pending) sendSay(msg);
    };
    socket.onmessage = (e) => {
      let ev;
      try {
        ev = JSON.parse(e.data);
      } catch (_) {
        ev = { type: 'message', from: 'server', text: String(e.data) };
      }
      onEvent(ev);
    };
    socket.onclose = (e) => {
      socket = null;
      const delay = Math.min(10000, 1000 * 2 ** retries++);
      const why = opened ? 'closed' + (e.code ? ' ' + e.code : '') + (e.reason ? ': ' + e.reason : '') : 'refused or unreachable';
      setStatus('disconnected', why + ' — retrying in ' + Math.round(delay / 1000) + ' s');
      if (opened) addMessage('system', '', 'connection ' + why);
      setTimeout(connect, delay);
    };
  }

  $('join-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = $('name').value.trim();
    if (!name) return;
    $('join').disabled = true;
    $('join-error').hidden = true;
    try {
      const res = await fetch('/auth/login', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ name }),
      });
      const data = await res.json();
      if (!res.ok) throw new Error(data.error || res.statusText);
      session = data;
      $('me').textContent = data.name;
      $('join-form').hidden = true;
      $('chat').hidden = false;
      $('text').focus();
      connect();
    } catch (err) {
      $('join-error').textContent = 'Could not join: ' + err.message;
      $('join-error').hidden = false;
      $('join').disabled = false;
    }
  });

  $('say-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('text').value.trim();
    if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
    if (pending.length >= MAX_PENDING) {
      addMessage('system', '', 'not sent: ' + MAX_PENDING + ' messages are still waiting for an answer');
      return;
    }
    const msg = { id: ++lastId, text };
    pending.push(msg);
    sendSay(msg);
    $('text').value = '';
  });
})();
