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

async function api(path, token, method, payload) {
  const headers = { Authorization: "Bearer " + (token || sessionStorage.getItem(TOKEN_KEY)) };
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: method || "GET",
    headers,
    body: payload === undefined ? undefined : JSON.stringify(payload),
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
/// Bytes in the unit that reads best.
function size(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (v >= 1024 && unit < units.length - 1) { v /= 1024; unit += 1; }
  return (unit === 0 || v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + units[unit];
}

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
  const manage = el("section", { class: "card" });
  const usersCard = el("section", { class: "card" });
  const backupsCard = el("section", { class: "card" });
  const eventsCard = el("section", { class: "card" });
  main.append(head, figures, chartsCard, manage, usersCard, backupsCard, eventsCard);
  const base = "/v1/databases/" + encodeURIComponent(id);
  buildManage(manage, base, () => load());
  buildUsers(usersCard, base);
  buildBackups(backupsCard, base);
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
      manage.update(db);
      usersCard.update();
      backupsCard.update();
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
    items.push(item(node.name + " memory", size(node.memory.current) + " of " + size(node.memory.limit)));
    if (node.connections) items.push(item(node.name + " sessions", node.connections.open + " of " + node.connections.max));
    if (node.replication_lag) items.push(item(node.name + " lag", node.replication_lag.bytes + " B, " + node.replication_lag.seconds.toFixed(1) + " s"));
    if (node.container.unlimited_reason) items.push(item(node.name + " no memory limit", node.container.unlimited_reason));
  }
  const disk = stats.size.disk;
  items.push(item("data size", size(stats.size.logical)));
  if (disk) items.push(item("on disk", size(disk.total) + " (data " + size(disk.data) + ", WAL " + size(disk.wal) + ", other " + size(disk.other) + ")"));
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

/// Follows operation `op` until it ends, showing its progress in `line`; then `done`.
async function follow(op, line, done) {
  for (;;) {
    line.textContent = op.kind + ": " + op.status + (op.status === "running" ? " " + Math.round(op.progress * 100) + " %" : "")
      + (op.error ? ": " + op.error : "");
    line.dataset.status = op.status;
    if (op.status === "succeeded" || op.status === "failed") break;
    await new Promise((r) => setTimeout(r, 500));
    try {
      op = await api("/v1/operations/" + encodeURIComponent(op.id));
    } catch (e) {
      line.textContent = e.message;
      return;
    }
  }
  if (done) done();
}

/// Runs `action` (an API call), showing its error, if any, in `line`.
async function act(line, action) {
  line.textContent = "";
  line.classList.remove("error");
  try {
    return await action();
  } catch (e) {
    line.textContent = e.message;
    line.classList.add("error");
    if (e.status === 401) failed(e);
    return null;
  }
}

function buildManage(card, base, reload) {
  const line = el("p", { id: "manage-status", role: "status" });
  const tls = el("input", { type: "checkbox", id: "force-tls" });
  tls.addEventListener("change", () => act(line, async () => {
    await api(base + "/tls", null, "PUT", { force: tls.checked });
    line.textContent = tls.checked ? "TLS is now required" : "TLS is now optional";
    reload();
  }));
  const plans = el("select", { id: "plan", "aria-label": "Plan" });
  const engines = el("select", { id: "engine", "aria-label": "Engine version" });
  const changePlan = el("button", { type: "button", id: "change-plan", text: "Change plan" });
  changePlan.addEventListener("click", () => act(line, async () => {
    const r = await api(base, null, "PATCH", { plan: plans.value });
    follow(r.operation, line, reload);
  }));
  const upgrade = el("button", { type: "button", id: "upgrade-engine", text: "Upgrade engine" });
  upgrade.addEventListener("click", () => act(line, async () => {
    const r = await api(base + "/engine-upgrade", null, "POST", { version: engines.value });
    follow(r.operation, line, reload);
  }));
  card.replaceChildren(el("h2", { text: "Settings" }),
    el("label", {}, tls, " Require TLS from clients"),
    el("p", {}, plans, " ", changePlan, " ", engines, " ", upgrade), line);
  Promise.all([api("/v1/plans"), api("/v1/engines")]).then(([planList, engineList]) => {
    plans.replaceChildren(...planList.map((p) => el("option", { value: p.name, text: p.name + " (" + p.memory_mib + " MiB, " + p.nodes + " node" + (p.nodes > 1 ? "s" : "") + ")" })));
    engines.replaceChildren(...engineList.map((e) => el("option", { value: e.version, text: "PostgreSQL " + e.version })));
  }).catch(failed);
  card.update = (db) => {
    tls.checked = db.tls.force;
    if (document.activeElement !== plans) plans.value = db.plan;
  };
}

function buildUsers(card, base) {
  const line = el("p", { id: "users-status", role: "status" });
  const shown = el("p", { id: "new-password" });
  const name = el("input", { id: "user-name", "aria-label": "User name", placeholder: "name" });
  const readOnly = el("input", { type: "checkbox", id: "user-read-only" });
  const body = el("tbody");
  const once = (u) => shown.replaceChildren("Password of " + u.name + " (shown once): ",
    el("code", { class: "url", text: u.database_url }));
  const create = el("button", { type: "button", id: "create-user", text: "Create user" });
  create.addEventListener("click", () => act(line, async () => {
    const u = await api(base + "/users", null, "POST", { name: name.value.trim(), read_only: readOnly.checked });
    once(u);
    name.value = "";
    card.update();
  }));
  card.replaceChildren(el("h2", { text: "Users" }), el("table", { id: "users" }, body),
    el("p", {}, name, " ", el("label", { class: "inline" }, readOnly, " read-only"), " ", create), shown, line);
  card.update = () => api(base + "/users").then((users) => {
    body.replaceChildren(...users.map((u) => {
      const reset = el("button", { type: "button", class: "plain", text: "Reset password" });
      reset.addEventListener("click", () => act(line, async () => once(await api(base + "/users/" + encodeURIComponent(u.name) + "/reset-password", null, "POST"))));
      const remove = el("button", { type: "button", class: "plain", text: "Delete" });
      remove.addEventListener("click", () => act(line, async () => { await api(base + "/users/" + encodeURIComponent(u.name), null, "DELETE"); card.update(); }));
      return el("tr", {}, el("td", { text: u.name }), el("td", { text: u.read_only ? "read-only" : "read-write" }),
        el("td", {}, reset, " ", u.default ? "" : remove));
    }));
  }).catch(failed);
}

function buildBackups(card, base) {
  const line = el("p", { id: "backups-status", role: "status" });
  const body = el("tbody");
  const create = el("button", { type: "button", id: "create-backup", text: "Back up now" });
  create.addEventListener("click", () => act(line, async () => {
    const r = await api(base + "/backups", null, "POST");
    card.update();
    follow(r.operation, line, () => card.update());
  }));
  const hour = el("input", { type: "number", min: "0", max: "23", id: "backup-hour", "aria-label": "Daily backup hour (UTC)" });
  const schedule = el("button", { type: "button", class: "plain", id: "set-backup-hour", text: "Set daily backup hour (UTC)" });
  schedule.addEventListener("click", () => act(line, async () => {
    const r = await api(base + "/backup-schedule", null, "PUT", { hour_utc: Number(hour.value) });
    line.textContent = "Daily backups at " + String(r.hour_utc).padStart(2, "0") + ":00 UTC";
  }));
  card.replaceChildren(el("h2", { text: "Backups" }), el("table", { id: "backups" }, body),
    el("p", {}, create, " ", hour, " ", schedule), line);
  card.update = () => api(base + "/backups").then((backups) => {
    body.replaceChildren(...backups.slice().reverse().map((b) => {
      const download = el("button", { type: "button", class: "plain", text: "Download" });
      download.disabled = b.status !== "succeeded";
      download.addEventListener("click", () => act(line, async () => {
        const response = await fetch(base + "/backups/" + encodeURIComponent(b.id) + "/download", {
          headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) }, cache: "no-store" });
        if (!response.ok) throw new ApiError(response.status, "download failed: " + response.statusText);
        const link = el("a", { href: URL.createObjectURL(await response.blob()), download: b.id + ".dump" });
        link.click();
        URL.revokeObjectURL(link.href);
      }));
      return el("tr", { "data-backup": b.id }, el("td", { text: b.started_at }), el("td", { text: b.kind }),
        el("td", { class: "backup-status", text: b.status }), el("td", { text: size(b.size_bytes) }),
        el("td", { text: b.error || "" }), el("td", {}, download));
    }));
  }).catch(failed);
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
