// first-hop-proxy dashboard. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Every list it keeps is bounded, so the page can stay open for days.
"use strict";

(() => {
  const MAX_ROWS = 200; // requests kept in the live table
  const MAX_BUFFER = 4 * 1024 * 1024; // characters of an unfinished event before it is dropped
  const TOKEN_KEY = "fhp-admin-token";
  const RECONNECT_MS = [1000, 2000, 5000, 10000, 30000]; // waits between tries to reconnect

  const $ = (selector) => document.querySelector(selector);

  // el("td", {class: "x"}, "text", child): text always goes in as text, never as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ---- formatting ---------------------------------------------------------------------
  // Times come as Unix seconds, or as ISO timestamps (the breaker's).
  const toDate = (t) => (typeof t === "string" ? new Date(t) : new Date(t * 1000));
  const clock = (t) => (t ? toDate(t).toLocaleTimeString([], { hour12: false }) : "");
  const dayClock = (t) =>
    t
      ? toDate(t).toLocaleString([], {
          month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
        })
      : "";
  function seconds(value) {
    if (value === null || value === undefined) return "";
    if (value < 1) return `${Math.round(value * 1000)} ms`;
    if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
    return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  }
  function bytes(n) {
    if (!n) return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }
  function uptime(s) {
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : `${m} min`;
  }
  const percent = (rate) => (rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(rate < 1 ? 1 : 0)} %`);
  const isFailure = (status) => status >= 400 && status !== 499;

  // ---- the admin token ----------------------------------------------------------------
  let loginWaiters = [];
  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }
  function askToken(wrong) {
    setConn("locked", "token needed");
    $("#login-error").hidden = !wrong;
    $("#login-error").textContent = wrong ? "That token was not accepted. Check it and try again." : "";
    $("#login").hidden = false;
    $("#login-token").focus();
    return new Promise((resolve) => loginWaiters.push(resolve));
  }
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#login-token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#login-token").value = "";
    $("#login").hidden = true;
    const waiters = loginWaiters;
    loginWaiters = [];
    waiters.forEach((resolve) => resolve());
  });

  // fetch() with the token; asks for it (again) on a 401 and retries.
  async function api(path, options) {
    for (;;) {
      const response = await fetch(path, { cache: "no-store", ...options, headers: authHeaders() });
      if (response.status !== 401) return response;
      const hadToken = Boolean(sessionStorage.getItem(TOKEN_KEY));
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(hadToken);
    }
  }

  async function problem(response) {
    try {
      const body = await response.json();
      return body.error.message;
    } catch {
      return `HTTP ${response.status}`;
    }
  }

  // ---- connection state ---------------------------------------------------------------
  function setConn(state, text) {
    const pill = $("#conn");
    pill.dataset.state = state;
    pill.textContent = text || state;
  }

  // ---- the live feed ------------------------------------------------------------------
  const rows = new Map(); // request id -> {tr, data}, newest first in the table
  let errorsTimer = 0;
  const feedBody = $("#feed tbody");

  const CODE_NAMES = {
    empty_response: "empty reply",
    connection_error: "connection error",
    cut_short: "cut short",
    invalid_json: "not JSON",
    hard_stop: "hard stop",
  };
  const codeName = (code) => CODE_NAMES[code] || code;

  function retryText(attempts) {
    const reasons = attempts
      .filter((a) => a.action === "retry")
      .map((a) => codeName(a.code || String(a.status ?? "error")));
    const counts = new Map();
    for (const r of reasons) counts.set(r, (counts.get(r) || 0) + 1);
    return [...counts].map(([r, n]) => (n > 1 ? `${r} ×${n}` : r)).join(", ");
  }

  function statusBadge(s) {
    if (s.state === "running") return el("span", { class: "badge running", text: "running" });
    const status = s.status;
    if (status === 499) return el("span", { class: "badge muted", text: "client left" });
    return el("span", { class: `badge ${isFailure(status) ? "bad" : ""}`, text: String(status ?? "–") });
  }

  function renderRow(tr, s) {
    const attempts = s.attempts || [];
    const running = s.state === "running";
    const failed = !running && isFailure(s.status);
    tr.className = running ? "running" : failed ? "failed" : "";
    tr.dataset.id = s.id;
    tr.dataset.status = running ? "running" : String(s.status);
    tr.tabIndex = 0;
    tr.title = failed && s.error ? s.error : "";
    const why = retryText(attempts);
    const reasons = attempts.filter((a) => a.action === "retry").map((a) => `#${a.n}: ${a.reason}`).join("\n");
    tr.replaceChildren(
      el("td", { text: clock(s.time) }),
      el("td", { class: "model", text: s.model || "–", title: s.model || "" }),
      el("td", { class: "hide-narrow", text: s.stream ? "stream" : "json" }),
      el("td", { class: "hide-narrow", text: s.upstream || "" }),
      el("td", {}, statusBadge(s)),
      el("td", { text: String(attempts.length || (running ? "…" : 0)) }),
      el("td", { class: "why hide-narrow", text: why, title: reasons }),
      el("td", { class: "elapsed", text: running ? seconds(Date.now() / 1000 - s.time) : seconds(s.duration) }),
      el("td", { class: "hide-narrow", text: seconds(s.first_token) }),
      el("td", { class: "hide-narrow", text: bytes(s.size) }),
    );
  }

  // live: from a "request" event (not a snapshot being replayed).
  function upsert(s, live) {
    let row = rows.get(s.id);
    if (!row) {
      row = { tr: el("tr"), data: s };
      rows.set(s.id, row);
      feedBody.prepend(row.tr);
      while (rows.size > MAX_ROWS) {
        const oldest = rows.keys().next().value;
        rows.get(oldest).tr.remove();
        rows.delete(oldest);
      }
    }
    row.data = s;
    renderRow(row.tr, s);
    const eventful = isFailure(s.status) || (s.attempts || []).length > 1;
    if (live && s.state === "done" && !$("#tab-errors").hidden && eventful) {
      clearTimeout(errorsTimer);
      errorsTimer = setTimeout(loadErrors, 500); // once the error logs are on disk
    }
    if (openDetail && openDetail.kind === "request" && openDetail.id === s.id) showRequest(s.id, true);
    updateFeedCount();
  }

  function updateFeedCount() {
    $("#feed-empty").hidden = rows.size > 0;
    let running = 0;
    for (const { data } of rows.values()) if (data.state === "running") running++;
    $("#feed-count").textContent = rows.size ? `${rows.size} shown${running ? `, ${running} running` : ""}` : "";
  }

  function applySnapshot(snapshot) {
    rows.clear();
    feedBody.replaceChildren();
    const all = [...snapshot.recent, ...snapshot.running].sort((a, b) => a.time - b.time);
    for (const s of all.slice(-MAX_ROWS)) upsert(s);
    updateFeedCount();
  }

  // Running requests show their time so far.
  setInterval(() => {
    const now = Date.now() / 1000;
    for (const { tr, data } of rows.values()) {
      if (data.state === "running") tr.querySelector(".elapsed").textContent = seconds(now - data.time);
    }
  }, 1000);

  feedBody.addEventListener("click", (event) => {
    const tr = event.target.closest("tr");
    if (tr && tr.dataset.id) showRequest(tr.dataset.id);
  });
  feedBody.addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr");
    if (tr && tr.dataset.id && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      showRequest(tr.dataset.id);
    }
  });

  // ---- health -------------------------------------------------------------------------
  function figure(label, value, bad) {
    return el("div", {}, el("dt", { text: label }), el("dd", { class: bad ? "bad" : "", text: String(value) }));
  }

  function renderUpstream(u) {
    const b = u.circuit_breaker;
    const state = b.enabled ? b.state : "disabled";
    const label = { closed: "circuit closed", open: "circuit open", half_open: "probing", disabled: "breaker off" }[state];
    const box = el("div", { class: `panel upstream ${state}`, "data-upstream": u.name, "data-breaker": state });
    box.append(
      el("div", {}, el("span", { class: "name", text: u.name }), " ", el("span", { class: `badge ${state}`, text: label })),
      el("div", { class: "url muted small mono", text: u.url }),
    );
    if (state === "open") {
      const retry = b.next_probe_at ? ` · next probe at ${clock(b.next_probe_at)}` : "";
      box.append(el("p", { class: "bad-text small", text: `Open since ${clock(b.opened_at)} after ${b.consecutive_failures} failures in a row${retry}. New requests fail at once until a probe succeeds.` }));
    } else if (b.consecutive_failures) {
      box.append(el("p", { class: "muted small", text: `${b.consecutive_failures} of ${b.failure_threshold} failures in a row` }));
    }
    if (u.last_error && state !== "closed") box.append(el("p", { class: "said small", text: `last error: ${u.last_error}` }));
    const grid = el("div", { class: "figures small" }, el("span"), el("span", { class: "muted", text: "5 min" }), el("span", { class: "muted", text: "60 min" }));
    for (const [name, key, fmt] of [
      ["success", "success_rate", percent],
      ["median latency", "p50_ms", (v) => (v === null ? "–" : seconds(v / 1000))],
      ["attempts", "attempts", String],
    ]) {
      grid.append(el("span", { text: name }), el("span", { text: fmt(u.last_5_minutes[key]) }), el("span", { text: fmt(u.last_60_minutes[key]) }));
    }
    box.append(grid);
    if (u.keys) {
      const ready = u.keys.filter((k) => !k.until).length;
      box.append(el("p", { class: "muted small", text: `keys: ${ready} of ${u.keys.length} ready` }));
    }
    return box;
  }

  let lastMinutes = null;
  function renderChart(minutes) {
    lastMinutes = minutes;
    const box = $("#chart");
    const W = Math.max(200, Math.round(box.clientWidth || 600));
    const H = Math.max(120, Math.round(box.clientHeight || 120)), top = 14, bottom = 16;
    const n = minutes.length;
    const max = Math.max(1, ...minutes.map((m) => m.requests));
    const scale = (H - top - bottom) / max;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    add("line", { class: "grid", x1: 0, x2: W, y1: H - bottom + 0.5, y2: H - bottom + 0.5 });
    add("line", { class: "grid", x1: 0, x2: W, y1: top + 0.5, y2: top + 0.5 });
    const slot = W / n;
    minutes.forEach((m, i) => {
      const x = i * slot + 1, w = Math.max(1, slot - 2);
      const title = `${clock(m.t).slice(0, 5)}: ${m.requests} requests, ${m.failures} failed`;
      if (m.requests) {
        const h = Math.max(1, m.requests * scale);
        const bar = add("rect", { class: "ok", x, y: H - bottom - h, width: w, height: h });
        bar.append(Object.assign(document.createElementNS(ns, "title"), { textContent: title }));
      }
      if (m.failures) {
        const h = Math.max(1, m.failures * scale);
        const bar = add("rect", { class: "bad", x, y: H - bottom - h, width: w, height: h });
        bar.append(Object.assign(document.createElementNS(ns, "title"), { textContent: title }));
      }
    });
    add("text", { x: 0, y: 10 }, `${max} / min`);
    add("text", { x: 0, y: H - 3 }, "60 min ago");
    add("text", { x: W, y: H - 3, "text-anchor": "end" }, "now");
    box.replaceChildren(svg);
  }
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => lastMinutes && renderChart(lastMinutes), 150);
  });

  function renderHealth(h) {
    $("#about").textContent = `v${h.version} · up ${uptime(h.uptime_seconds)}`;
    $("#demo-note").hidden = !h.demo_mode;
    $("#upstreams").replaceChildren(...h.upstreams.map(renderUpstream));
    const c = h.counters;
    const refused = Object.values(c.refusals).reduce((a, b) => a + b, 0);
    $("#counters").replaceChildren(
      figure("requests", c.requests),
      figure("in flight", h.in_flight),
      figure("retries", c.retries),
      figure("recategorized", c.recategorizations),
      figure("hard stops", c.hard_stops, c.hard_stops > 0),
      figure("empty replies", c.empty_replies),
      figure("client aborts", c.client_aborts),
      figure("refused", refused, refused > 0),
    );
    const reasons = Object.entries(c.retries_by_reason);
    $("#retry-reasons").textContent = reasons.length
      ? `Retries by reason: ${reasons.map(([r, n]) => `${codeName(r)} ×${n}`).join(", ")}`
      : "";
    renderChart(h.per_minute);
    const w = h.logging.writer;
    $("#writer").replaceChildren(
      figure("written", w.written),
      figure("dropped", w.dropped, w.dropped > 0),
      figure("failures", w.failures, w.failures > 0),
      figure("queued", w.queued),
    );
    const failing = w.last_error;
    $("#writer-error").hidden = !failing;
    $("#writer-error").textContent = failing
      ? `Last write error: ${failing} (request logs: ${h.logging.request_log.folder}, error logs: ${h.logging.error_log.folder})`
      : "";
  }

  // ---- the event stream ---------------------------------------------------------------
  function dispatch(block) {
    let kind = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) kind = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (!data) return;
    let value;
    try {
      value = JSON.parse(data);
    } catch {
      return;
    }
    if (kind === "snapshot") applySnapshot(value);
    else if (kind === "request") upsert(value, true);
    else if (kind === "health") renderHealth(value);
  }

  let failures = 0;
  async function connect() {
    setConn("connecting");
    try {
      const response = await api("/dashboard/api/events");
      if (!response.ok || !response.body) throw new Error(await problem(response));
      setConn("live");
      failures = 0;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
        if (buffer.length > MAX_BUFFER) buffer = "";
      }
    } catch {
      // the proxy restarted or the network dropped: try again below
    }
    setConn("reconnecting");
    setTimeout(connect, RECONNECT_MS[Math.min(failures++, RECONNECT_MS.length - 1)]);
  }

  // ---- the detail panel ---------------------------------------------------------------
  let openDetail = null; // {kind, id}

  function openPanel(title, kind, id) {
    openDetail = { kind, id };
    $("#detail-title").textContent = title;
    $("#detail").hidden = false;
  }
  function closePanel() {
    openDetail = null;
    $("#detail").hidden = true;
    $("#detail-body").replaceChildren();
  }
  $("#detail-close").addEventListener("click", closePanel);
  $("#detail").addEventListener("click", (event) => {
    if (event.target === $("#detail")) closePanel();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#detail").hidden) closePanel();
  });

  function facts(pairs) {
    const dl = el("dl", { class: "facts" });
    for (const [k, v] of pairs) if (v !== null && v !== undefined && v !== "") dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
    return dl;
  }

  function timeline(attempts) {
    if (!attempts.length) return el("p", { class: "muted", text: "No upstream attempt was made (the request was refused or failed before it)." });
    const ol = el("ol", { class: "timeline" });
    const several = new Set(attempts.map((a) => a.upstream || "")).size > 1;
    for (const a of attempts) {
      const where = several && a.upstream ? `${a.upstream} · ` : "";
      const what = `#${a.n} · ${where}${a.status ?? "no reply"} · ${a.action || "?"}`;
      const li = el("li", { class: a.action || "", "data-action": a.action || "" },
        el("div", { class: "what", text: what }, a.duration !== null && a.duration !== undefined ? el("span", { class: "muted", text: ` in ${seconds(a.duration)}` }) : null),
        a.reason ? el("div", { text: a.reason }) : null,
        a.recategorized ? el("div", { class: "muted", text: `recategorized: ${a.recategorized}` }) : null,
        a.error ? el("div", { class: "said", text: `upstream said: ${a.error}` }) : null,
        a.note ? el("div", { class: "muted", text: a.note }) : null,
        a.delay !== null && a.delay !== undefined ? el("div", { class: "wait", text: `waited ${seconds(a.delay)} before the next attempt` }) : null,
        a.reply ? block("What the upstream replied", a.reply) : null,
      );
      ol.append(li);
    }
    return ol;
  }

  function headerTable(pairs) {
    return facts(pairs.map(([k, v]) => [k, v]));
  }

  function block(title, text, open) {
    return el("details", { open: open || null }, el("summary", { text: title }), el("pre", { class: "code", text }));
  }

  async function rawView(path, file) {
    const holder = el("div");
    const button = el("button", { type: "button", text: "Show the raw log file" });
    button.addEventListener("click", async () => {
      const response = await api(path);
      if (!response.ok) {
        holder.replaceChildren(el("p", { class: "bad-text", text: await problem(response) }));
        return;
      }
      const text = await response.text();
      const save = el("a", { download: file, text: `Save ${file}` });
      save.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
      setTimeout(() => URL.revokeObjectURL(save.href), 60000);
      holder.replaceChildren(save, el("pre", { class: "code raw", text }));
    });
    holder.append(button);
    return holder;
  }

  async function showRequest(id, refresh) {
    const row = rows.get(id);
    const s = row ? row.data : { id, attempts: [] };
    if (!refresh) openPanel(`Request ${id}`, "request", id);
    const body = $("#detail-body");
    const summary = facts([
      ["started", dayClock(s.time)],
      ["model", s.model],
      ["type", s.stream === undefined ? "" : s.stream ? "stream" : "json"],
      ["upstream", s.upstream],
      ["status", s.state === "running" ? "running" : s.status],
      ["time taken", seconds(s.duration)],
      ["first token", seconds(s.first_token)],
      ["size", bytes(s.size)],
      ["error", s.error],
    ]);
    const story = el("div", { id: "request-story" }, el("h3", { text: "Attempts" }), timeline(s.attempts || []));
    body.replaceChildren(summary, story);
    if (s.state === "running") {
      story.append(el("p", { class: "muted", text: "Still running: this view updates when it ends." }));
      return;
    }
    for (let tries = 0; tries < 20; tries++) {
      if (!openDetail || openDetail.id !== id) return;
      const response = await api(`/dashboard/api/requests/${encodeURIComponent(id)}`);
      if (response.status === 202) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        continue;
      }
      if (!openDetail || openDetail.id !== id) return;
      if (!response.ok) {
        story.append(el("p", { class: "muted", text: await problem(response) }));
        return;
      }
      renderRequestLog(story, await response.json());
      return;
    }
    story.append(el("p", { class: "muted", text: "Its log file is not on disk yet (the log writer may be behind, or dropped it); try again in a moment." }));
  }

  async function renderRequestLog(story, d) {
    const parts = [];
    if (d.outcome || d.status_sent) {
      parts.push(facts([
        ["outcome", d.outcome],
        ["status sent", d.status_sent ? `${d.status_sent} (the reply had started before it failed)` : ""],
      ]));
    }
    parts.push(el("h3", { text: "Attempts" }), timeline(d.attempts));
    if (d.resumes.length) {
      parts.push(el("h3", { text: "Stream resumed" }), el("p", { text: "The stream broke after its first content and was finished by a continuation (error_handling.stream_resume)." }));
      for (const r of d.resumes) parts.push(block(`Resume #${r.n}`, r.text, true));
    }
    if (d.original_body !== null) {
      parts.push(el("h3", { text: "Rewrite" }), el("p", { text: "The regex_replacement rules changed the request before it was sent." }),
        block("Original request (as the client sent it)", d.original_body), block("Request as sent upstream", d.request_body || ""));
    }
    if (d.error) parts.push(el("h3", { text: "Error" }), el("pre", { class: "code bad-text", text: d.error }));
    if (d.response !== null && d.response !== "(no response)") parts.push(el("h3", { text: d.stream ? "Reply (assembled from the stream)" : "Reply" }), el("pre", { class: "code", text: d.response }));
    if (d.original_body === null && d.request_body !== null) parts.push(block("Request body", d.request_body));
    if (d.request_headers.length) parts.push(el("h3", { text: "Request headers (secrets masked)" }), headerTable(d.request_headers));
    if (d.response_headers.length) parts.push(el("h3", { text: "Reply headers" }), headerTable(d.response_headers));
    if (d.truncated.length) parts.push(el("p", { class: "muted small", text: `Cut short here (see the raw file): ${d.truncated.join(", ")}` }));
    parts.push(el("h3", { text: "Log file" }), el("p", { class: "mono small", text: d.file }), await rawView(d.raw, d.file));
    story.replaceChildren(...parts);
  }

  // ---- errors -------------------------------------------------------------------------
  const filters = $("#error-filters");
  let errorsLoading = 0;

  function fillSelect(select, values, counts) {
    const chosen = select.value;
    const options = [el("option", { value: "", text: "all" })];
    for (const v of values) options.push(el("option", { value: v, text: counts ? `${v} (${counts[v]})` : v }));
    select.replaceChildren(...options);
    select.value = values.includes(chosen) ? chosen : "";
  }

  async function loadErrors() {
    const ticket = ++errorsLoading;
    const form = new FormData(filters);
    const query = new URLSearchParams();
    if (form.get("code")) query.set("code", form.get("code"));
    if (form.get("upstream")) query.set("upstream", form.get("upstream"));
    if (form.get("since")) query.set("since", String(Date.now() / 1000 - Number(form.get("since"))));
    const response = await api(`/dashboard/api/errors?${query}`);
    if (ticket !== errorsLoading) return;
    const tbody = $("#errors tbody");
    if (!response.ok) {
      $("#errors-summary").textContent = await problem(response);
      return;
    }
    const listing = await response.json();
    fillSelect(filters.elements.code, Object.keys(listing.codes), listing.codes);
    fillSelect(filters.elements.upstream, listing.upstreams);
    $("#errors-summary").textContent = `${listing.files.length} shown of ${listing.total} error logs on disk`;
    tbody.replaceChildren(...listing.files.map((f) => {
      const tr = el("tr", { "data-name": f.name, "data-code": f.code, tabindex: 0 },
        el("td", { text: dayClock(f.mtime) }),
        el("td", {}, el("span", { class: "badge warn", text: f.code })),
        el("td", { class: "msg", text: [f.type, f.message].filter(Boolean).join(": ") }),
        el("td", { class: "hide-narrow", text: f.upstream || "" }),
        el("td", { class: "hide-narrow" },
          f.request_id ? el("button", { type: "button", class: "link mono", "data-request": f.request_id, text: f.request_id }) : ""));
      return tr;
    }));
  }

  async function showError(name) {
    openPanel(name, "error", name);
    const body = $("#detail-body");
    body.replaceChildren(el("p", { class: "muted", text: "Loading…" }));
    const response = await api(`/logs/errors/${encodeURIComponent(name)}`);
    if (!openDetail || openDetail.id !== name) return;
    body.replaceChildren(response.ok ? el("pre", { class: "code raw", text: await response.text() }) : el("p", { class: "bad-text", text: await problem(response) }));
  }

  filters.addEventListener("change", loadErrors);
  $("#errors-refresh").addEventListener("click", loadErrors);
  $("#errors tbody").addEventListener("click", (event) => {
    const request = event.target.closest("button[data-request]");
    if (request) return showRequest(request.dataset.request);
    const tr = event.target.closest("tr");
    if (tr) showError(tr.dataset.name);
  });
  $("#errors tbody").addEventListener("keydown", (event) => {
    const tr = event.target.closest("tr");
    if (tr && event.key === "Enter") showError(tr.dataset.name);
  });

  // ---- config -------------------------------------------------------------------------
  // The config as YAML, the way config.yaml is written (JSON quoting for strings is valid YAML).
  function scalar(v) {
    if (v === null) return "null";
    if (typeof v === "string") return /^[A-Za-z0-9_./-]+$/.test(v) && !/^(true|false|null|yes|no|on|off|[0-9.]+)$/i.test(v) ? v : JSON.stringify(v);
    return String(v);
  }
  function yaml(value, indent) {
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      if (value.every((v) => v === null || typeof v !== "object")) return `[${value.map(scalar).join(", ")}]`;
      return value.map((v) => `\n${indent}- ${yaml(v, indent + "  ").trimStart()}`).join("");
    }
    if (value !== null && typeof value === "object") {
      const keys = Object.keys(value);
      if (!keys.length) return "{}";
      return keys.map((k) => {
        const v = value[k];
        const nested = v !== null && typeof v === "object" && (Array.isArray(v) ? v.some((x) => x !== null && typeof x === "object") : Object.keys(v).length);
        return `\n${indent}${scalar(k)}:${nested ? "" : " "}${yaml(v, indent + "  ")}`;
      }).join("");
    }
    return scalar(value);
  }

  async function loadConfig() {
    const response = await api("/dashboard/api/config");
    if (!response.ok) {
      $("#config-source").textContent = await problem(response);
      return;
    }
    const c = await response.json();
    const from = c.path ? `from ${c.path}` : c.demo_mode ? "(no config file: demo mode)" : "(not from a file)";
    $("#config-source").textContent = `Effective config ${from}, loaded ${dayClock(c.loaded_at)}. Secrets are masked.`;
    $("#config-warnings").replaceChildren(...c.warnings.map((w) => el("li", { text: `warning: ${w}` })));
    $("#config-text").textContent = yaml(c.config, "").trimStart();
  }

  // ---- tabs ---------------------------------------------------------------------------
  function showTab(name) {
    if (!["live", "errors", "config"].includes(name)) name = "live";
    for (const button of document.querySelectorAll(".tabs button")) {
      if (button.dataset.tab === name) button.setAttribute("aria-current", "page");
      else button.removeAttribute("aria-current");
    }
    for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
    if (name === "errors") loadErrors();
    if (name === "config") loadConfig();
  }
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => {
      history.replaceState(null, "", `#${button.dataset.tab}`);
      showTab(button.dataset.tab);
    });
  }

  showTab(location.hash.slice(1));
  connect();
})();
