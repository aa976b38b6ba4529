// pgwarden's dashboard: every figure and action comes from the control plane's HTTP API (the
// one the CLI calls), with the API token in the Authorization header. The token stays in this
// tab's sessionStorage, never in a URL or a cookie. Text from the API is only ever set as text
// (textContent), never parsed as HTML.
"use strict";

const TOKEN_KEY = "pgwarden-token";
const main = document.getElementById("main");
let refresh = null;
const charts = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "on") for (const [event, f] of Object.entries(value)) node.addEventListener(event, f);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, token) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + (token || sessionStorage.getItem(TOKEN_KEY)) },
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

function clear() {
  if (refresh) clearInterval(refresh);
  refresh = null;
  while (charts.length) charts.pop().destroy();
  main.replaceChildren();
}

function showLogin(message) {
  clear();
  document.getElementById("logout").hidden = true;
  main.append(document.getElementById("login-template").content.cloneNode(true));
  const error = document.getElementById("login-error");
  error.textContent = message || "";
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    try {
      await api("/v1/databases", token);
    } catch (e) {
      error.textContent = e.status === 401
        ? "This token was refused: use the API token of this control plane."
        : "The control plane did not answer: " + e.message;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    route();
  });
}

function failed(e) {
  if (e.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Your session ended: log in again.");
  } else {
    main.append(el("p", { class: "error", role: "alert", text: e.message }));
  }
}

async function showList() {
  clear();
  const card = el("section", { class: "card" }, el("h1", { text: "Databases" }));
  main.append(card);
  try {
    const databases = await api("/v1/databases");
    if (!databases.length) {
      card.append(el("p", { class: "muted", text: "No database yet: pgwarden create NAME --plan PLAN." }));
      return;
    }
    const rows = databases.map((db) => el("tr", {},
      el("td", {}, el("a", { href: "#/db/" + encodeURIComponent(db.id), text: db.name })),
      el("td", { text: db.id }),
      el("td", { class: "status-" + db.status, text: db.status }),
      el("td", { text: db.plan }),
      el("td", { text: String(db.nodes.length) })));
    card.append(el("table", { id: "databases" },
      el("thead", {}, el("tr", {}, ...["Name", "Id", "Status", "Plan", "Nodes"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...rows)));
  } catch (e) {
    failed(e);
  }
}

const MIB = 1024 * 1024;
const mib = (v) => (v == null ? "–" : (v / MIB).toFixed(0) + " MiB");

/// The URL with its password hidden.
function masked(url) {
  return url.replace(/^(\w+:\/\/[^:/@]+:)[^@]*@/, "$1••••••@");
}

const RANGES = { "1 hour": 3600, "6 hours": 6 * 3600, "1 day": 86400, "7 days": 7 * 86400 };

async function showDatabase(id) {
  clear();
  const head = el("section", { class: "card" });
  const figures = el("section", { class: "card" });
  const chartsCard = el("section", { class: "card" });
  const eventsCard = el("section", { class: "card" });
  main.append(head, figures, chartsCard, eventsCard);
  let range = 3600;
  const select = el("select", { id: "range", "aria-label": "Chart range", on: { change: () => { range = RANGES[select.value]; load(); } } },
    ...Object.keys(RANGES).map((name) => el("option", { text: name })));

  async function load() {
    try {
      const [db, stats, events] = await Promise.all([
        api("/v1/databases/" + encodeURIComponent(id)),
        api("/v1/databases/" + encodeURIComponent(id) + "/stats"),
        api("/v1/databases/" + encodeURIComponent(id) + "/events"),
      ]);
      const since = new Date(Date.now() - range * 1000).toISOString().replace(/\.\d+Z$/, "Z");
      const history = await api("/v1/databases/" + encodeURIComponent(id) + "/stats/history?since=" + encodeURIComponent(since));
      renderHead(head, db);
      renderFigures(figures, stats);
      renderCharts(chartsCard, select, history);
      renderEvents(eventsCard, events);
    } catch (e) {
      failed(e);
    }
  }
  await load();
  refresh = setInterval(load, 10000);
}

function renderHead(card, db) {
  const url = el("code", { class: "url", id: "database-url", text: masked(db.database_url) });
  const reveal = el("button", { type: "button", class: "plain", id: "reveal-url", text: "Show password" });
  reveal.addEventListener("click", () => {
    const hidden = url.textContent !== db.database_url;
    url.textContent = hidden ? db.database_url : masked(db.database_url);
    reveal.textContent = hidden ? "Hide password" : "Show password";
  });
  const nodes = db.nodes.map((n) => el("tr", {},
    el("td", { text: n.name }), el("td", { text: n.role }), el("td", { text: n.status }),
    el("td", { text: n.version }), el("td", { text: n.host + ":" + n.port })));
  card.replaceChildren(
    el("h1", { id: "database-name", text: db.name }),
    el("p", {}, el("span", { class: "status-" + db.status, id: "database-status", text: db.status }),
      " · plan ", el("strong", { id: "database-plan", text: db.plan }),
      " · replication " + db.replication + " · TLS " + (db.tls.force ? "required" : "optional")),
    el("p", {}, url, " ", reveal),
    el("table", { id: "nodes" },
      el("thead", {}, el("tr", {}, ...["Node", "Role", "Status", "Version", "Address"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...nodes)));
}

function renderFigures(card, stats) {
  const item = (label, value) => el("div", {}, el("span", { text: label }), value);
  const items = [];
  for (const node of stats.nodes) {
    items.push(item(node.name + " memory", mib(node.memory.current) + " of " + mib(node.memory.limit)));
    if (node.connections) items.push(item(node.name + " sessions", node.connections.open + " of " + node.connections.max));
    if (node.replication_lag) items.push(item(node.name + " lag", node.replication_lag.bytes + " B, " + node.replication_lag.seconds.toFixed(1) + " s"));
    if (node.container.unlimited_reason) items.push(item(node.name + " no memory limit", node.container.unlimited_reason));
  }
  const disk = stats.size.disk;
  items.push(item("data size", mib(stats.size.logical)));
  if (disk) items.push(item("on disk", mib(disk.total) + " (data " + mib(disk.data) + ", WAL " + mib(disk.wal) + ", other " + mib(disk.other) + ")"));
  items.push(item("last backup", stats.backups.last_backup_at || "none"));
  items.push(item("point-in-time recovery", stats.pitr ? stats.pitr.earliest + " to " + stats.pitr.latest : "none"));
  card.replaceChildren(el("h2", { text: "Now" }), el("div", { class: "figures", id: "figures" }, ...items),
    el("p", { class: "muted", text: "sampled at " + stats.sampled_at }));
}

const COLORS = ["#2563eb", "#db2777", "#059669", "#d97706"];

function chart(container, title, at, series) {
  const box = el("div", { class: "chart", "data-chart": title });
  container.append(box);
  const opts = {
    title,
    width: 360,
    height: 200,
    series: [{}].concat(series.map((s, i) => ({
      label: s.label,
      stroke: s.limit ? "#9ca3af" : COLORS[i % COLORS.length],
      dash: s.limit ? [6, 4] : undefined,
      spanGaps: false,
    }))),
    axes: [{}, { size: 60 }],
  };
  charts.push(new uPlot(opts, [at].concat(series.map((s) => s.values)), box));
}

function renderCharts(card, select, history) {
  while (charts.length) charts.pop().destroy();
  const grid = el("div", { class: "grid", id: "charts" });
  card.replaceChildren(el("h2", {}, "Over time ", select), grid);
  const at = history.at;
  if (!at.length) {
    grid.append(el("p", { class: "muted", text: "No samples in this range yet." }));
    return;
  }
  const scaled = (values, by) => values.map((v) => (v == null ? null : v / by));
  for (const node of history.nodes) {
    chart(grid, node.name + ": CPU %", at, [{ label: "CPU %", values: node.cpu_percent }]);
    chart(grid, node.name + ": memory (MiB)", at, [
      { label: "memory", values: scaled(node.memory, MIB) },
      { label: "limit", values: scaled(node.memory_limit, MIB), limit: true },
    ]);
    chart(grid, node.name + ": swap (MiB)", at, [
      { label: "swap", values: scaled(node.swap, MIB) },
      { label: "limit", values: scaled(node.swap_limit, MIB), limit: true },
    ]);
    chart(grid, node.name + ": sessions", at, [
      { label: "open", values: node.connections_open },
      { label: "max_connections", values: node.connections_max, limit: true },
    ]);
    if (node.lag_bytes.some((v) => v != null)) {
      chart(grid, node.name + ": replication lag (bytes)", at, [{ label: "lag", values: node.lag_bytes }]);
    }
  }
  chart(grid, "size (MiB)", at, [
    { label: "data size", values: scaled(history.size_logical, MIB) },
    { label: "on disk: data", values: scaled(history.disk_data, MIB) },
    { label: "on disk: WAL", values: scaled(history.disk_wal, MIB) },
  ]);
}

function renderEvents(card, events) {
  const rows = events.slice(-50).reverse().map((e) => el("tr", {},
    el("td", { text: e.at }), el("td", { text: e.kind }), el("td", { text: e.message })));
  card.replaceChildren(el("h2", { text: "Events" }),
    el("table", { id: "events" }, el("tbody", {}, ...rows)));
}

function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  document.getElementById("logout").hidden = false;
  const match = location.hash.match(/^#\/db\/(.+)$/);
  if (match) showDatabase(decodeURIComponent(match[1]));
  else showList();
}

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.hash = "#/";
  showLogin();
});
window.addEventListener("hashchange", route);
route();
