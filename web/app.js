// Switchboard's chat page: the room protocol over one WebSocket, with reconnection
// (exponential backoff, full jitter), resume after the last id seen, and messages sent
// again with their nonce until the room acknowledges them. Where a WebSocket cannot be
// opened (the browser has none, or something between refuses the upgrade while the
// server answers HTTP), the same protocol goes over HTTP: the room's events as
// Server-Sent Events, the page's events as POSTs. Every text shown goes through
// textContent: nothing received is ever parsed as HTML.
'use strict';

(() => {
  const ROOM_RULE = /^[A-Za-z0-9._:-]{1,128}$/;
  const BACKOFF_INITIAL_MS = 250;
  const BACKOFF_MAX_MS = 30000;
  // A connection that stayed up this long starts the backoff over when lost.
  const STABLE_MS = 10000;
  const TYPING_IDLE_MS = 3000;
  const TYPING_REFRESH_MS = 3000;
  const TYPING_FADE_MS = 8000;
  const RETRYABLE = new Set(['rate_limited', 'unavailable']);

  const $ = (id) => document.getElementById(id);
  const view = {
    join: $('join-view'),
    joinForm: $('join-form'),
    joinName: $('join-name'),
    joinRoom: $('join-room'),
    joinError: $('join-error'),
    chat: $('chat-view'),
    roomName: $('room-name'),
    meName: $('me-name'),
    status: $('status'),
    leave: $('leave'),
    messages: $('messages'),
    members: $('members'),
    memberCount: $('member-count'),
    typing: $('typing'),
    sendForm: $('send-form'),
    message: $('message'),
  };

  const randomHex = () =>
    Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, '0')).join('');

  const state = {
    name: '',
    room: '',
    me: '',
    conn: null, // the open connection: {transport, close(), send(event), extensions}
    // 'websocket', or 'events' once a WebSocket could not be opened (for this page).
    transport: typeof WebSocket === 'function' ? 'websocket' : 'events',
    upgradesRefused: 0, // WebSockets that did not open while the server answered HTTP
    welcomed: false,
    leaving: false,
    lastId: null, // the last message id shown: the resume point
    epoch: null, // the room's stream that id belongs to
    joinedAt: null, // the room's last id when first joined, until a message arrives
    attempt: 0,
    connectedAt: 0,
    retryTimer: 0,
    countdown: 0,
    members: new Set(),
    // Members before the connection was lost: their rejoining is not news.
    before: new Set(),
    typing: new Map(), // user -> fade timer
    pending: [], // {nonce, text, el}: sent, not yet acknowledged
    noncePrefix: randomHex(),
    nonceSeq: 0,
    typingSentAt: 0,
    typingIdle: 0,
  };

  // ---- joining ----

  function nameProblem(name) {
    if (!name) return 'Enter a name.';
    if ([...name].length > 64) return 'A name is at most 64 characters.';
    if (/[\u0000-\u001f\u007f]/.test(name)) return 'A name cannot contain control characters.';
    return '';
  }

  function roomProblem(room) {
    if (!room) return 'Enter a room.';
    if (!ROOM_RULE.test(room)) return 'Room names use letters, digits and . _ : - (up to 128).';
    return '';
  }

  function join(name, room) {
    state.name = name;
    state.room = room;
    state.leaving = false;
    state.lastId = null;
    state.joinedAt = null;
    state.attempt = 0;
    state.pending = [];
    view.messages.replaceChildren();
    view.roomName.textContent = room;
    view.meName.textContent = name;
    view.join.hidden = true;
    view.chat.hidden = false;
    document.title = `#${room} · Switchboard`;
    const query = new URLSearchParams({ room, name });
    history.replaceState(null, '', `/?${query}`);
    connect();
    view.message.focus();
  }

  view.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = view.joinName.value.trim();
    const room = view.joinRoom.value.trim();
    const problem = nameProblem(name) || roomProblem(room);
    view.joinError.textContent = problem;
    if (!problem) join(name, room);
  });

  view.leave.addEventListener('click', () => {
    state.leaving = true;
    clearTimeout(state.retryTimer);
    clearInterval(state.countdown);
    stopTyping();
    if (state.conn) state.conn.close();
    state.conn = null;
    view.chat.hidden = true;
    view.join.hidden = false;
    document.title = 'Switchboard';
    history.replaceState(null, '', '/');
    view.joinName.value = state.name;
    view.joinRoom.value = state.room;
  });

  // ---- the connection ----

  function setStatus(kind, text) {
    view.status.dataset.state = kind;
    view.status.textContent = text;
  }

  function roomUrl(scheme) {
    const params = new URLSearchParams({ name: state.name });
    const since = state.lastId ?? state.joinedAt;
    if (since !== null) params.set('since', String(since));
    if (since !== null && state.epoch) params.set('epoch', state.epoch);
    return `${scheme}//${location.host}/room/${encodeURIComponent(state.room)}?${params}`;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    clearInterval(state.countdown);
    setStatus(state.attempt ? 'reconnecting' : 'connecting',
      state.attempt ? `reconnecting… (attempt ${state.attempt})` : 'connecting…');
    state.welcomed = false;
    if (state.transport === 'events') connectEvents();
    else connectWebSocket();
  }

  function received(conn, text) {
    if (state.conn !== conn || typeof text !== 'string') return;
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return;
    }
    if (data.type === 'welcome') onWelcome(data);
    else onEvent(data);
  }

  function lost(conn, event) {
    if (state.conn !== conn) return;
    state.conn = null;
    state.welcomed = false;
    onClosed(event);
  }

  function connectWebSocket() {
    const ws = new WebSocket(roomUrl(location.protocol === 'https:' ? 'wss:' : 'ws:'));
    let opened = false;
    const conn = {
      transport: 'websocket',
      close: () => ws.close(1000, 'left'),
      send: (event) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
      },
      get extensions() {
        return ws.extensions;
      },
    };
    state.conn = conn;
    ws.addEventListener('open', () => {
      opened = true;
      state.upgradesRefused = 0;
    });
    ws.addEventListener('message', (event) => received(conn, event.data));
    // An error is always followed by a close.
    ws.addEventListener('close', async (event) => {
      if (state.conn !== conn) return;
      const refused = !opened && !state.leaving && (await serverAnswers());
      if (state.conn !== conn) return;
      if (refused && ++state.upgradesRefused >= 2) {
        // Twice the server answered HTTP but no WebSocket opened (once could be a
        // server just coming back): something between refuses the upgrade. The room
        // goes over HTTP from now on.
        state.transport = 'events';
        state.conn = null;
        notice('WebSocket is unavailable here: connecting over HTTP streaming instead.');
        connect();
        return;
      }
      lost(conn, event);
    });
  }

  async function serverAnswers() {
    try {
      await fetch('/healthz', { cache: 'no-store' });
      return true;
    } catch {
      return false;
    }
  }

  function connectEvents() {
    const source = new EventSource(roomUrl(location.protocol));
    const conn = {
      transport: 'events',
      close: () => source.close(),
      send: (event) => post(conn, event),
      extensions: '',
    };
    state.conn = conn;
    source.onmessage = (event) => received(conn, event.data);
    // The page resumes by itself (with since and epoch), with its own backoff.
    source.onerror = () => {
      source.close();
      lost(conn, {});
    };
  }

  async function post(conn, event) {
    const params = new URLSearchParams({ name: state.name });
    const url = `/room/${encodeURIComponent(state.room)}/events?${params}`;
    let answer;
    try {
      const response = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(event),
      });
      answer = response.status === 202 && event.type !== 'message' ? null : await response.json();
    } catch {
      // Not sent (or not answered in JSON): a pending message goes again in a second,
      // and after the next welcome if the stream is lost meanwhile.
      if (event.type === 'message') {
        setTimeout(() => {
          if (state.pending.some((p) => p.nonce === event.nonce)) send(event);
        }, 1000);
      }
      return;
    }
    if (state.conn !== conn || !answer) return;
    if (answer.type === 'error') {
      onError(answer);
    } else if (answer.type === 'message' && state.lastId !== null && answer.id <= state.lastId) {
      // A retried message stored before, already shown: acknowledged.
      const index = state.pending.findIndex((p) => p.nonce === answer.nonce);
      if (index >= 0) {
        state.pending[index].el.remove();
        state.pending.splice(index, 1);
      }
    }
  }

  function onWelcome(welcome) {
    const resumedAfter = state.lastId ?? state.joinedAt;
    const otherEpoch = Boolean(state.epoch && welcome.epoch && welcome.epoch !== state.epoch);
    const wentBack = state.lastId !== null && welcome.lastId < state.lastId;
    if (otherEpoch || wentBack) {
      // The room's history was reset (a server keeping it in memory restarted): its ids
      // start again, and the newest that follow are new here.
      state.lastId = null;
      state.joinedAt = welcome.lastId;
    }
    if (welcome.epoch) state.epoch = welcome.epoch;
    if (state.joinedAt === null) state.joinedAt = welcome.lastId;
    state.me = welcome.user;
    state.welcomed = true;
    state.connectedAt = Date.now();
    view.meName.textContent = welcome.user;
    document.body.dataset.extensions = state.conn ? state.conn.extensions : '';
    document.body.dataset.transport = state.transport;
    state.members = new Set(welcome.members);
    for (const member of welcome.members) state.before.delete(member);
    setTimeout(() => state.before.clear(), STABLE_MS);
    renderMembers();
    clearTyping();
    setStatus('connected', state.transport === 'events'
      ? 'connected over HTTP streaming (WebSocket unavailable)' : 'connected');
    if (resumedAfter === null) {
      notice(`You joined #${welcome.room} as ${welcome.user}.`);
    } else if (welcome.recovered === false || otherEpoch || wentBack) {
      notice('Reconnected: some messages from while away are no longer kept; the newest follow.');
    } else {
      const missed = Math.max(0, welcome.lastId - resumedAfter);
      notice(missed ? `Reconnected: ${missed} new message${missed === 1 ? '' : 's'} while away.` : 'Reconnected.');
    }
    // Unacknowledged messages go again, in order; the room stores each nonce once.
    for (const pending of state.pending) {
      send({ type: 'message', text: pending.text, nonce: pending.nonce });
    }
  }

  function onClosed(event) {
    if (state.leaving) return;
    if (state.connectedAt && Date.now() - state.connectedAt >= STABLE_MS) state.attempt = 0;
    const wasUp = state.connectedAt !== 0;
    if (wasUp) state.before = new Set(state.members);
    state.connectedAt = 0;
    state.attempt += 1;
    clearTyping();
    if (wasUp) {
      const why = event.code && event.code !== 1006 ? ` (${event.code}${event.reason ? ` ${event.reason}` : ''})` : '';
      notice(`Connection lost${why}. Reconnecting…`);
    }
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** (state.attempt - 1));
    const delay = Math.random() * ceiling;
    const at = Date.now() + delay;
    const show = () => {
      const left = Math.max(0, at - Date.now()) / 1000;
      setStatus('reconnecting', `reconnecting in ${left.toFixed(1)} s (attempt ${state.attempt})`);
    };
    show();
    state.countdown = setInterval(show, 200);
    state.retryTimer = setTimeout(connect, delay);
  }

  // Back online: no reason to wait out the backoff.
  window.addEventListener('online', () => {
    if (!state.conn && !state.leaving && state.room) connect();
  });

  function send(event) {
    if (state.conn && state.welcomed) state.conn.send(event);
  }

  // ---- room events ----

  function onEvent(event) {
    switch (event.type) {
      case 'message':
        onMessage(event);
        break;
      case 'typing':
        if (event.user !== state.me) setTyping(event.user, event.isTyping === true);
        break;
      case 'join':
        state.members.add(event.user);
        renderMembers();
        if (!state.before.delete(event.user)) notice(`${event.user} joined.`);
        break;
      case 'leave':
        state.members.delete(event.user);
        setTyping(event.user, false);
        renderMembers();
        notice(`${event.user} left.`);
        break;
      case 'error':
        onError(event);
        break;
      default:
        break;
    }
  }

  function onMessage(message) {
    if (message.nonce && message.from === state.me) {
      const index = state.pending.findIndex((p) => p.nonce === message.nonce);
      if (index >= 0) {
        state.pending[index].el.remove();
        state.pending.splice(index, 1);
      }
    }
    // Replayed after a reconnection, or acknowledged again: shown already.
    if (state.lastId !== null && message.id <= state.lastId) return;
    state.lastId = message.id;
    const from = message.from ?? 'server';
    setTyping(from, false);
    append(messageElement(from, shownText(message), message.timestamp, message.id));
  }

  function onError(error) {
    const index = error.nonce ? state.pending.findIndex((p) => p.nonce === error.nonce) : -1;
    if (index < 0) {
      notice(`The room said: ${error.message}`);
      return;
    }
    const pending = state.pending[index];
    if (RETRYABLE.has(error.code)) {
      setTimeout(() => send({ type: 'message', text: pending.text, nonce: pending.nonce }), 1000);
      return;
    }
    state.pending.splice(index, 1);
    pending.el.classList.replace('pending', 'failed');
    pending.el.querySelector('.badge').textContent = `not sent: ${error.message}`;
  }

  // ---- showing things (textContent only) ----

  function nameColor(name) {
    let hash = 5381;
    for (const ch of name) hash = ((hash * 33) ^ ch.codePointAt(0)) >>> 0;
    return `hsl(${hash % 360} 60% var(--name-lightness))`;
  }

  function span(className, text) {
    const el = document.createElement('span');
    el.className = className;
    el.textContent = text;
    return el;
  }

  function localTime(timestamp) {
    const date = new Date(timestamp);
    if (Number.isNaN(date.getTime())) return '';
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // A message's text, its data as JSON, or both.
  function shownText(message) {
    const parts = [];
    if (typeof message.text === 'string') parts.push(message.text);
    if (message.data !== undefined) parts.push(JSON.stringify(message.data));
    return parts.join(' ');
  }

  function messageElement(from, text, timestamp, id) {
    const li = document.createElement('li');
    li.className = 'message';
    if (from === state.me) li.classList.add('mine');
    if (id !== undefined) li.dataset.id = String(id);
    const head = document.createElement('div');
    head.className = 'head';
    const who = span('from', from);
    who.style.color = nameColor(from);
    head.append(who);
    const time = document.createElement('time');
    time.className = 'time';
    if (timestamp) {
      time.dateTime = timestamp;
      time.textContent = localTime(timestamp);
      time.title = new Date(timestamp).toLocaleString();
    }
    head.append(time);
    li.append(head, span('text', text));
    return li;
  }

  function notice(text) {
    const li = document.createElement('li');
    li.className = 'notice';
    li.textContent = text;
    append(li);
  }

  function append(el) {
    const list = view.messages;
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    // Messages go before the ones still being sent, which stay at the end.
    const firstPending = state.pending.length ? state.pending[0].el : null;
    if (firstPending && firstPending.parentNode === list && el !== firstPending && !el.classList.contains('pending')) {
      list.insertBefore(el, firstPending);
    } else {
      list.append(el);
    }
    if (nearBottom || el.classList.contains('mine') || el.classList.contains('pending')) {
      list.scrollTop = list.scrollHeight;
    }
  }

  function renderMembers() {
    const items = [...state.members].sort((a, b) => a.localeCompare(b)).map((member) => {
      const li = document.createElement('li');
      const dot = span('dot', '');
      dot.style.background = nameColor(member);
      li.append(dot, span('name', member));
      if (member === state.me) li.append(span('you', '(you)'));
      return li;
    });
    view.members.replaceChildren(...items);
    view.memberCount.textContent = String(state.members.size);
  }

  function setTyping(user, isTyping) {
    clearTimeout(state.typing.get(user));
    if (isTyping) {
      state.typing.set(user, setTimeout(() => setTyping(user, false), TYPING_FADE_MS));
    } else {
      state.typing.delete(user);
    }
    renderTyping();
  }

  function clearTyping() {
    for (const timer of state.typing.values()) clearTimeout(timer);
    state.typing.clear();
    renderTyping();
  }

  function renderTyping() {
    const names = [...state.typing.keys()].sort();
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    view.typing.textContent = text;
  }

  // ---- sending ----

  function stopTyping() {
    clearTimeout(state.typingIdle);
    if (state.typingSentAt) {
      state.typingSentAt = 0;
      send({ type: 'typing', isTyping: false });
    }
  }

  // "Started" once (refreshed while typing goes on), "stopped" on send, on an empty
  // line, or after a pause: not one event per key.
  view.message.addEventListener('input', () => {
    if (!view.message.value) {
      stopTyping();
      return;
    }
    const now = Date.now();
    if (!state.typingSentAt || now - state.typingSentAt >= TYPING_REFRESH_MS) {
      state.typingSentAt = now;
      send({ type: 'typing', isTyping: true });
    }
    clearTimeout(state.typingIdle);
    state.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  });

  view.sendForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = view.message.value.trim();
    view.message.value = '';
    stopTyping();
    if (!text) return;
    state.nonceSeq += 1;
    const nonce = `${state.noncePrefix}-${state.nonceSeq}`;
    const el = messageElement(state.me || state.name, text, '', undefined);
    el.classList.add('pending');
    el.append(span('badge', 'sending…'));
    state.pending.push({ nonce, text, el });
    append(el);
    send({ type: 'message', text, nonce });
  });

  // ---- start ----

  const query = new URLSearchParams(location.search);
  const name = (query.get('name') || '').trim();
  const room = (query.get('room') || '').trim();
  if (room) view.joinRoom.value = room;
  if (name) view.joinName.value = name;
  if (name && room && !nameProblem(name) && !roomProblem(room)) {
    join(name, room);
  } else if (name || room) {
    view.joinError.textContent = nameProblem(name) || roomProblem(room);
  }
})();
