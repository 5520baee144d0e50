// The emlisten web console: polls the API every 2 seconds and redraws in place. Every value
// from the API is written with textContent (never as HTML).

const POLL_MS = 2000;
const PAGE_SIZE = 50;
const TOKEN_KEY = "emlisten.apiToken";

const view = {
  q: "",
  state: "",
  protocol: "",
  sort: "email",
  offset: 0,
  selected: null, // mailbox id shown in the detail panel
  deadLetters: true, // false once the service says it has no dead-letter API
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// -- API ------------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized("the API token is missing or wrong");
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { status: response.status, ok: response.ok, body };
}

function askForToken(message) {
  const form = $("token-form");
  form.hidden = false;
  $("token-error").textContent = message || "";
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  $("token-change").hidden = false;
  refreshNow();
});

$("token-change").addEventListener("click", () => askForToken(""));

// -- formatting -----------------------------------------------------------------------------

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "now";
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function ago(timestamp, now) {
  return timestamp ? `${age(Math.max(0, now - timestamp))} ago` : "–";
}

function clock(timestamp) {
  return new Date(timestamp * 1000).toLocaleTimeString([], { hour12: false });
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}` }, state);
}

// -- nodes ----------------------------------------------------------------------------------

function renderOverview(data) {
  $("node-name").textContent = `node ${data.node} · v${data.version}`;
  const status = data.status || {};
  const connections = status.Connections || {};
  const summary = $("summary");
  const facts = [
    ["mailboxes", connections.Total ?? 0],
    ["listening", connections.listening ?? 0],
    ["failing", (connections.authenticationError ?? 0) + (connections.connectError ?? 0)],
    ["starting", (connections.starting ?? 0) + (connections.connecting ?? 0)],
    ["store", status.Store ?? "?"],
  ];
  if (status.Draining !== undefined) facts.push(["delivering now", status.Draining]);
  summary.replaceChildren(...facts.map(([name, value]) => el("span", {}, `${name} `, el("b", {}, value))));
  const rows = (data.nodes || []).map((node) =>
    el(
      "tr",
      { "data-id": node.id },
      el("td", {}, node.id, node.id === data.node ? el("span", { class: "muted" }, " (this one)") : null),
      el("td", {}, node.role),
      el("td", { class: "num" }, node.mailboxes),
      el("td", { class: "num" }, age(node.heartbeat_age_seconds)),
      el("td", { class: "num" }, age(node.uptime_seconds)),
      el("td", {}, node.version || ""),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "No node has sent a heartbeat yet.")));
  $("node-rows").replaceChildren(...rows);
}

// -- chart ----------------------------------------------------------------------------------

let chart = null;

function chartWidth() {
  return Math.max(300, $("chart").clientWidth || 600);
}

function renderStats(data) {
  const minutes = data.minutes || [];
  const columns = [
    minutes.map((m) => m.t),
    minutes.map((m) => m.delivered),
    minutes.map((m) => m.latency_avg),
    minutes.map((m) => m.latency_p95),
  ];
  $("chart-totals").textContent = `· ${data.delivered} delivered, ${data.failed} failed attempts`;
  if (typeof uPlot === "undefined") return; // the deferred library is not there yet
  if (chart === null) {
    chart = new uPlot(
      {
        width: chartWidth(),
        height: 220,
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true }, count: { range: (u, min, max) => [0, Math.max(5, max * 1.1)] }, s: {} },
        axes: [
          {},
          { scale: "count", label: "emails / min", size: 55 },
          { scale: "s", side: 1, label: "latency (s)", grid: { show: false }, size: 55 },
        ],
        series: [
          {},
          {
            label: "delivered",
            scale: "count",
            stroke: "#2e5aac",
            fill: "rgba(46, 90, 172, 0.35)",
            paths: uPlot.paths.bars({ size: [0.7, 40] }),
            points: { show: false },
          },
          // Points too: a minute with mail between two quiet ones has no line to draw.
          { label: "latency avg", scale: "s", stroke: "#12805c", width: 1.5, points: { show: true, size: 5 } },
          { label: "latency p95", scale: "s", stroke: "#b54708", width: 1.5, dash: [4, 3], points: { show: true, size: 5 } },
        ],
      },
      columns,
      $("chart"),
    );
  } else {
    chart.setData(columns);
  }
}

window.addEventListener("resize", () => {
  if (chart !== null) chart.setSize({ width: chartWidth(), height: 220 });
});

// -- mailboxes ------------------------------------------------------------------------------

const STATES = ["listening", "starting", "connecting", "authenticationError", "connectError"];

function mailboxQuery() {
  const params = new URLSearchParams({ offset: view.offset, limit: PAGE_SIZE, sort: view.sort });
  if (view.q) params.set("q", view.q);
  if (view.state) params.set("state", view.state);
  if (view.protocol) params.set("protocol", view.protocol);
  return `/ui/api/mailboxes?${params}`;
}

function renderMailboxes(page, now) {
  if (!page.items.length && page.offset > 0 && page.total > 0) {
    // Mailboxes went away under this page: show the last one that has rows.
    view.offset = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
    again = true;
    return;
  }
  $("mailbox-total").textContent = `· ${page.registered} registered`;
  const counts = page.counts || {};
  const all = Object.values(counts).reduce((a, b) => a + b, 0);
  const chip = (state, label, count) =>
    el(
      "button",
      {
        type: "button",
        class: view.state === state ? "active" : "",
        "data-state": state,
        onclick: () => {
          view.state = state;
          view.offset = 0;
          refreshNow();
        },
      },
      `${label} (${count})`,
    );
  const chips = [chip("", "all", all)];
  for (const state of STATES) chips.push(chip(state, state, counts[state] || 0));
  $("state-chips").replaceChildren(...chips);

  const rows = page.items.map((m) =>
    el(
      "tr",
      {
        "data-id": m.id,
        class: m.id === view.selected ? "selected" : "",
        tabIndex: 0, // reachable from the keyboard: Enter opens the detail
        onclick: () => openDetail(m.id),
        onkeydown: (event) => {
          if (event.key === "Enter") openDetail(m.id);
        },
      },
      el("td", {}, m.email, el("span", { class: "id" }, m.id)),
      el("td", { class: "state-cell" }, stateBadge(m.state)),
      el("td", {}, m.protocol, el("span", { class: "id" }, m.server)),
      el("td", {}, m.node || "–"),
      el("td", {}, ago(m.last_mail_at, now)),
      el("td", { class: "num" }, m.delivered),
      el("td", {}, ago(m.state_since, now)),
      el("td", { class: "err" }, m.last_error || ""),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 8, class: "muted" }, "No mailbox matches.")));
  $("mailbox-rows").replaceChildren(...rows);
  const first = page.total ? page.offset + 1 : 0;
  const last = Math.min(page.total, page.offset + page.items.length);
  $("page-info").textContent = `${first}–${last} of ${page.total}`;
  $("page-prev").disabled = page.offset === 0;
  $("page-next").disabled = last >= page.total;
}

let filterTimer = null;
$("filter-q").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => {
    view.q = $("filter-q").value.trim();
    view.offset = 0;
    refreshNow();
  }, 250);
});
$("filter-protocol").addEventListener("change", () => {
  view.protocol = $("filter-protocol").value;
  view.offset = 0;
  refreshNow();
});
$("sort").addEventListener("change", () => {
  view.sort = $("sort").value;
  view.offset = 0;
  refreshNow();
});
$("page-prev").addEventListener("click", () => {
  view.offset = Math.max(0, view.offset - PAGE_SIZE);
  refreshNow();
});
$("page-next").addEventListener("click", () => {
  view.offset += PAGE_SIZE;
  refreshNow();
});

// -- detail ---------------------------------------------------------------------------------

function openDetail(id) {
  view.selected = id;
  $("detail").hidden = false;
  refreshNow();
}

$("detail-close").addEventListener("click", () => {
  view.selected = null;
  $("detail").hidden = true;
  refreshNow();
});

function describeEvent(event) {
  switch (event.kind) {
    case "delivered":
      return `delivered ${event.count} email(s) from ${event.folder}` +
        (event.latency !== undefined ? ` in ${event.latency.toFixed(3)} s` : "");
    case "delivery_failed":
      return `delivery from ${event.folder} failed: ${event.error}`;
    case "state":
      return `state ${event.state}` + (event.error ? `: ${event.error}` : "");
    case "webhook":
      if (event.outcome === "delivered") return `webhook ${event.type} ${event.event} accepted by the receiver`;
      if (event.outcome === "dead_letter") {
        return `webhook ${event.type} ${event.event} dead-lettered after ${event.attempts} attempt(s): ${event.error}`;
      }
      return `webhook ${event.type} ${event.event} attempt ${event.attempts} failed, will retry: ${event.error}`;
    default:
      return event.kind;
  }
}

function renderDetail(m, now) {
  $("detail-email").textContent = m.email;
  const fields = [
    ["Id", m.id],
    ["State", stateBadge(m.state)],
    ["Since", ago(m.state_since, now)],
    ["Last error", m.last_error || "–"],
    ["Protocol", m.protocol],
    ["Server", m.server],
    ["Delivers to", m.sink === "webhook" ? `webhook ${m.webhook_url || "(default)"}` : "Creatio"],
    ["Node", m.node || "–"],
    ["Delivered", m.delivered],
    ["Last mail", ago(m.last_mail_at, now)],
  ];
  $("detail-fields").replaceChildren(...fields.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  $("detail-folders").replaceChildren(
    ...m.folders.map((f) =>
      el("tr", {}, el("td", {}, f.name), el("td", { class: "num" }, f.uidvalidity ?? "–"), el("td", { class: "num" }, f.last_uid ?? "–")),
    ),
  );
  $("detail-events-node").textContent = `(kept in memory by node ${m.events_node})`;
  const events = m.events.map((event) => el("li", { "data-kind": event.kind }, el("time", {}, clock(event.at)), describeEvent(event)));
  if (!events.length) events.push(el("li", { class: "muted" }, "Nothing yet on this node."));
  $("detail-events").replaceChildren(...events);
}

// -- dead letters ---------------------------------------------------------------------------

function eventType(item) {
  if (item.event && typeof item.event === "object") return item.event.type || "";
  return item.type || item.event || "";
}

function renderDeadLetters(data) {
  const items = data.items || [];
  const total = data.total ?? data.count ?? items.length;
  $("dead-letter-total").textContent = `· ${total}`;
  $("replay-all").disabled = total === 0;
  const rows = items.map((item) =>
    el(
      "tr",
      { "data-id": item.id },
      el("td", {}, el("span", { class: "id" }, item.id)),
      el("td", {}, item.mailbox ?? item.mailbox_id ?? ""),
      el("td", {}, eventType(item)),
      el("td", { class: "num" }, item.attempts ?? ""),
      el("td", { class: "err" }, item.last_error || ""),
      el("td", {}, el("button", { type: "button", class: "replay", onclick: () => replay(item.id) }, "Replay")),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "None: every event was delivered.")));
  $("dead-letter-rows").replaceChildren(...rows);
}

async function replay(id) {
  const path = id === null ? "/v1/dead-letters/replay" : `/v1/dead-letters/${encodeURIComponent(id)}/replay`;
  try {
    const result = await api(path, { method: "POST" });
    $("dead-letter-message").textContent = result.ok
      ? (id === null ? "All dead letters queued again." : `Event ${id} queued again.`)
      : `Replay failed (HTTP ${result.status}).`;
  } catch (error) {
    if (error instanceof Unauthorized) askForToken(error.message);
    else $("dead-letter-message").textContent = `Replay failed: ${error.message}`;
  }
  refreshNow();
}

$("replay-all").addEventListener("click", () => replay(null));

// -- polling --------------------------------------------------------------------------------

let timer = null;
let running = false;
let again = false;
let waitingForToken = false;

async function refresh() {
  if (running) {
    again = true;
    return;
  }
  running = true;
  waitingForToken = false;
  clearTimeout(timer);
  const tokenUsed = sessionStorage.getItem(TOKEN_KEY);
  try {
    const [overview, page, stats, dead, detail] = await Promise.all([
      api("/ui/api/overview"),
      api(mailboxQuery()),
      api("/v1/stats"),
      view.deadLetters ? api("/v1/dead-letters?limit=100") : Promise.resolve(null),
      view.selected ? api(`/ui/api/mailboxes/${encodeURIComponent(view.selected)}`) : Promise.resolve(null),
    ]);
    const now = overview.body?.time ?? Date.now() / 1000;
    if (overview.ok) renderOverview(overview.body);
    if (page.ok) renderMailboxes(page.body, now);
    if (stats.ok) renderStats(stats.body);
    if (dead !== null) {
      if (dead.status === 404 || dead.status === 405) {
        view.deadLetters = false;
        $("dead-letters-note").hidden = false;
        $("dead-letters-note").textContent = "This service has no dead-letter API.";
      } else if (dead.ok) {
        renderDeadLetters(dead.body);
      }
    }
    if (detail !== null) {
      if (detail.ok) renderDetail(detail.body, now);
      else if (detail.status === 404) $("detail-email").textContent = "This mailbox is no longer registered.";
    }
    const failed = [overview, page, stats].find((r) => !r.ok);
    $("live").className = failed ? "live failed" : "live ok";
    $("live").textContent = failed ? `error: HTTP ${failed.status}` : `live · ${clock(now)}`;
    $("token-change").hidden = !sessionStorage.getItem(TOKEN_KEY);
  } catch (error) {
    $("live").className = "live failed";
    if (error instanceof Unauthorized && tokenUsed !== sessionStorage.getItem(TOKEN_KEY)) {
      again = true; // a token was given meanwhile: try it at once
    } else if (error instanceof Unauthorized) {
      // Wait for the token form (its submit refreshes): polling on would only be refused.
      waitingForToken = true;
      $("live").textContent = "API token needed";
      askForToken(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused." : "");
    } else {
      $("live").textContent = "cannot reach the service";
    }
  } finally {
    running = false;
    if (again) {
      again = false;
      refresh();
    } else if (!waitingForToken && !document.hidden) {
      // A tab in the background stops polling; it refreshes when it is shown again.
      timer = setTimeout(refresh, POLL_MS);
    }
  }
}

function refreshNow() {
  refresh();
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refreshNow();
});

refresh();
