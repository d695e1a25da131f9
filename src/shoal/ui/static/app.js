// Shoal web UI: three hash-routed pages (#gpus, #models, #playground) over the gateway's own API.
// Plain JavaScript, no framework, no build step, nothing fetched from outside the server.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const KEY = "shoal.apiKey";          // sessionStorage: the API key, when the server wants one
const LAUNCHES = "shoal.launches";   // sessionStorage: launch bodies sent from this tab, for relaunch
const POLL_MS = 2000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (Math.abs(n) >= GiB) return (n / GiB).toFixed(2) + " GiB";
  return Math.abs(n) >= MiB || n === 0 ? (n / MiB).toFixed(0) + " MiB" : (n / 1024).toFixed(0) + " KiB";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 0) return "never";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

// Python prints 1.0 where JavaScript prints 1; the server matches sizes as Python strings.
const pySize = (s) => (typeof s === "number" && Number.isInteger(s) ? s.toFixed(1) : s);

function colorOf(uid) {
  let h = 0;
  for (const ch of uid) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${(h * 137) % 360} 55% 42%)`;
}

// ---------------------------------------------------------------- API calls and the API key

class ApiError extends Error {
  constructor(status, data) {
    const error = data && data.error;
    super((error && error.message) || (typeof data === "string" && data) || `HTTP ${status}`);
    this.status = status;
    this.details = error && error.details;
  }
}

let keyPrompt = null;      // one dialog at a time; every 401 meanwhile waits for the same answer
let keyDeclined = false;   // after Cancel, polling stops asking until the header button is used

function askKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("#key-dialog");
      $("#key-msg").textContent = message;
      $("#key-input").value = "";
      dialog.returnValue = "";
      dialog.addEventListener("close", () => {
        keyPrompt = null;
        const key = $("#key-input").value.trim();
        if (dialog.returnValue === "ok" && key) {
          sessionStorage.setItem(KEY, key);
          keyDeclined = false;
          resolve(key);
        } else {
          keyDeclined = true;
          resolve(null);
        }
        showKeyButton();
      }, { once: true });
      dialog.showModal();
      $("#key-input").focus();
    });
  }
  return keyPrompt;
}

function showKeyButton() {
  const button = $("#key-button");
  const has = Boolean(sessionStorage.getItem(KEY));
  button.hidden = !has && !keyDeclined;
  button.textContent = has ? "Forget API key" : "Enter API key";
}

// fetch() with the key; on 401 asks for a key once and retries. `raw` returns the Response itself.
async function api(path, { method = "GET", json, body, signal, raw = false, interactive = true } = {}) {
  const headers = {};
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  for (let attempt = 0; ; attempt++) {
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    else delete headers.Authorization;
    const response = await fetch(path, { method, headers, body, signal });
    if (response.status === 401 && attempt < 2 && (interactive || !keyDeclined)) {
      if (key) sessionStorage.removeItem(KEY);
      const asked = await askKey(key ? "That API key was refused; enter another." : "This server needs an API key.");
      if (asked) continue;
    }
    if (raw) return response;
    const text = await response.text();
    let data = text;
    try { data = JSON.parse(text); } catch { /* plain text */ }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

async function errorOf(response) {
  const text = await response.text();
  try { return new ApiError(response.status, JSON.parse(text)); } catch { return new ApiError(response.status, text); }
}

// ---------------------------------------------------------------- pages and polling

const PAGES = ["gpus", "models", "playground"];
let page = "gpus";
let polling = false;

function route() {
  const wanted = location.hash.slice(1);
  page = PAGES.includes(wanted) ? wanted : "gpus";
  for (const p of PAGES) {
    $("#page-" + p).hidden = p !== page;
    $(`header nav a[href="#${p}"]`).classList.toggle("active", p === page);
  }
  if (page === "models") enterModels();
  poll();
}

async function poll() {
  if (polling || document.hidden) return;
  polling = true;
  try {
    if (page === "gpus") {
      // The workers only name the nodes (IP, up or down); without them the bars still show.
      const [devices, workers] = await Promise.all([
        api("/v1/cluster/devices", { interactive: false }),
        api("/v1/workers", { interactive: false }).catch(() => []),
      ]);
      renderDevices(devices, workers);
    } else if (page === "models") renderModels((await api("/v1/models", { interactive: false })).data);
    else fillModelSelects((await api("/v1/models", { interactive: false })).data);
    $("#status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("#status").textContent = err.status === 401 ? "API key needed" : "server unreachable: " + err.message;
  } finally {
    polling = false;
  }
}

// ---------------------------------------------------------------- GPUs page

function tip(lines) {
  // Tooltip text: one line per row, "label\tvalue" for two columns; the first line is the title.
  return lines.filter(Boolean).join("\n");
}

function breakdownTip(device, m) {
  const b = m.breakdown || {};
  const kv = b.kv_cache ? ` (${b.context_length} tokens × ${b.parallel})` : "";
  const measured = m.measured_bytes === null ? (device.fake ? "not measurable (fake GPU)" : "not yet") : bytes(m.measured_bytes);
  const lines = [
    `${m.model_uid} #${m.index} — ${m.state}${m.over_reservation ? " — OVER its reservation" : ""}`,
    `reserved\t${bytes(m.reserved_bytes)}`,
    `estimate\t${bytes(m.estimate_bytes)}${b.memory_source ? " (" + b.memory_source + ")" : b.declared ? " (declared)" : ""}`,
    b.formula_per_device !== undefined && b.memory_source !== "formula" ? `formula\t${bytes(b.formula_per_device)}` : "",
    b.correction ? `correction\t× ${b.correction} (similar models' profiles)` : "",
    `profile\t${m.profile_bytes ? bytes(m.profile_bytes) : b.profile && !b.profile.stale ? "stored" : "none"}${b.profile && b.profile.stale ? " (stored one stale)" : ""}`,
    `measured\t${measured}`,
    "--- estimate breakdown",
    `weights\t${bytes(b.weights)}${b.dtype ? " " + b.dtype : ""}`,
    `KV cache\t${bytes(b.kv_cache)}${kv}`,
    `activations\t${bytes(b.activations)}`,
    b.cuda_context ? `CUDA context\t${bytes(b.cuda_context)}` : "",
    b.cpu_runtime ? `CPU runtime\t${bytes(b.cpu_runtime)}` : "",
    `total\t${bytes(b.total)}`,
    b.per_device !== undefined ? `per device\t${bytes(b.per_device)}` : "",
    `in flight\t${m.in_flight}, idle ${duration(m.idle_seconds)}`,
    ...(b.notes || []).map((n) => "note: " + n),
    m.last_error ? "error: " + m.last_error : "",
  ];
  return tip(lines);
}

function segment(kind, size, total, name, tipText, extra = {}) {
  const width = (Math.max(0, size) / total) * 100;
  return el("div", { class: "seg " + kind, style: `width:${width}%`, "data-tip": tipText, ...extra },
    el("span", { class: "label" }, el("span", { text: name }), el("b", { text: bytes(size) })));
}

// label: the device's id on its node ("gpu:0") when the card sits under its node's heading.
function deviceCard(d, label = d.id) {
  const total = d.total_bytes || 1;
  const bar = el("div", { class: "bar", "data-device": d.id });
  for (const m of d.models) {
    const seg = segment("model " + m.state + (m.over_reservation ? " over" : ""), m.reserved_bytes, total,
      m.model_uid + (d.models.filter((x) => x.model_uid === m.model_uid).length > 1 ? " #" + m.index : ""),
      breakdownTip(d, m),
      { "data-uid": m.model_uid, "data-index": m.index });
    seg.style.setProperty("--c", colorOf(m.model_uid));
    if (m.measured_bytes) {
      const share = Math.min(100, (m.measured_bytes / Math.max(m.reserved_bytes, 1)) * 100);
      seg.prepend(el("div", { class: "measured", style: `width:${share}%` }));
    }
    bar.append(seg);
  }
  bar.append(...[
    d.used_by_others_bytes > 0 ? segment("others", d.used_by_others_bytes, total, "others",
      tip(["Used by other processes", `used\t${bytes(d.used_by_others_bytes)}`,
        d.kind === "cpu" ? "RAM in use outside Shoal's runners" : "memory not held by Shoal's runners"])) : null,
    segment("headroom", d.headroom_bytes, total, "headroom",
      tip(["Headroom", `kept free\t${bytes(d.headroom_bytes)}`, "never placed on (SHOAL_HEADROOM)"])),
    segment("free", d.free_bytes, total, "free",
      tip(["Free", `free\t${bytes(d.free_bytes)}`, `of\t${bytes(d.total_bytes)}`])),
  ].filter(Boolean));
  const rows = d.models.map((m) => el("tr", {},
    el("td", {}, el("i", { class: "sw", style: `background:${colorOf(m.model_uid)}` }), `${m.model_uid} #${m.index}`),
    el("td", { class: "state " + m.state, text: m.state }),
    el("td", { class: "num", text: bytes(m.reserved_bytes) }),
    el("td", { class: "num", text: bytes(m.estimate_bytes), title: (m.breakdown || {}).memory_source || "" }),
    el("td", { class: "num", text: bytes(m.profile_bytes) }),
    el("td", { class: "num", text: bytes(m.measured_bytes) }),
    el("td", { class: m.over_reservation ? "error" : "muted", text: m.over_reservation ? "over reservation" : "" }),
  ));
  const table = rows.length ? el("table", { class: "replicas" },
    el("tr", {}, ...["replica", "state", "reserved", "estimate", "profile", "measured", ""].map((h, i) =>
      el("th", { class: i >= 2 && i <= 5 ? "num" : null, text: h }))), ...rows) : null;
  return el("div", { class: "device", "data-device": d.id },
    el("div", { class: "device-head" },
      el("span", { class: "id", text: label }),
      d.name !== label ? el("span", { class: "muted", text: d.name }) : null,
      d.fake ? el("span", { class: "tag", text: "fake GPU: runners compute on the CPU" }) : null,
      d.cores ? el("span", { class: "tag", text: `${d.cores} cores` }) : null,
      d.kind === "gpu" && d.mps ? el("span", { class: "tag", title: d.mps.reason,
        text: d.mps.enabled ? "CUDA MPS: capped" : "no MPS" }) : null,
      el("span", { class: "summary" }, el("b", { text: bytes(d.free_bytes) }), ` free of ${bytes(d.total_bytes)}`,
        el("span", { class: "muted", text: ` · reserved ${bytes(d.reserved_bytes)} · others ${bytes(d.used_by_others_bytes)}` }))),
    bar,
    el("div", { class: "scale" }, el("span", { text: "0" }), el("span", { text: bytes(d.total_bytes / 2) }),
      el("span", { text: bytes(d.total_bytes) })),
    table);
}

// GPUs first, the CPU's RAM last.
const byKindAndIndex = (a, b) => (a.kind === "cpu") - (b.kind === "cpu") || a.index - b.index;
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// On a Ray cluster (devices name their node, or the workers are Ray nodes): one group per node, in
// the workers' order. A node that left the cluster keeps its group, without devices; a device whose
// node is not (yet) among the workers gets a group of its own. On one machine: null.
function nodeGroups(devices, workers) {
  if (!devices.some((d) => d.node) && !workers.some((w) => w.node_id)) return null;
  const groups = new Map();
  for (const w of workers) {
    if (w.node) groups.set(w.node, { node: w.node, ip: w.worker_ip, alive: w.alive !== false, runners: w.runners, devices: [] });
  }
  for (const d of devices) {
    const node = d.node || "?";
    if (!groups.has(node)) groups.set(node, { node, ip: null, alive: true, runners: null, devices: [] });
    groups.get(node).devices.push(d);
  }
  return [...groups.values()];
}

function localId(d) {
  return d.node && d.id.startsWith(d.node + "/") ? d.id.slice(d.node.length + 1) : d.id;
}

function nodeSection(g) {
  const gpus = g.devices.filter((d) => d.kind !== "cpu").length;
  const summary = [g.devices.length ? plural(gpus, "GPU") : null,
    typeof g.runners === "number" ? plural(g.runners, "runner") : null].filter(Boolean).join(" · ");
  const cards = g.devices.sort(byKindAndIndex).map((d) => deviceCard(d, localId(d)));
  return el("section", { class: "node" + (g.alive ? "" : " down"), "data-node": g.node },
    el("h2", { class: "node-head" },
      el("span", { class: "id", text: g.node }),
      el("span", { class: "muted", text: g.ip || "IP not known yet" }),
      g.alive ? null : el("span", { class: "tag down", text: "down" }),
      summary ? el("span", { class: "summary muted", text: summary }) : null),
    cards.length ? cards : el("p", { class: "muted empty",
      text: g.alive ? "No devices reported yet." : "Left the cluster: its devices are gone." }));
}

function renderDevices(devices, workers = []) {
  const groups = nodeGroups(devices, workers);
  if (groups) $("#devices").replaceChildren(...groups.map(nodeSection));
  else $("#devices").replaceChildren(...devices.sort(byKindAndIndex).map((d) => deviceCard(d)));
}

function showTip(event) {
  const box = $("#tooltip");
  const target = event.target.closest && event.target.closest("[data-tip]");
  if (!target) { box.hidden = true; return; }
  const [head, ...lines] = target.dataset.tip.split("\n");
  box.replaceChildren(el("div", { class: "head", text: head }), ...lines.flatMap((line) => {
    const [k, v] = line.split("\t");
    return v === undefined ? [el("div", { class: "full", text: k.replace(/^--- /, "") })]
      : [el("div", { text: k }), el("div", { class: "v", text: v })];
  }));
  box.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - box.offsetWidth - 8);
  const y = event.clientY + 16 + box.offsetHeight > window.innerHeight ? event.clientY - box.offsetHeight - 10 : event.clientY + 16;
  box.style.left = x + "px";
  box.style.top = y + "px";
}

// ---------------------------------------------------------------- Models page

const pending = new Map();  // uid -> "stopping…" / "relaunching…", kept across re-renders
let lastModels = [];

function keepAliveText(m) {
  if (m.pinned) return "pinned";
  return m.keep_alive < 0 ? "never evicted" : duration(m.keep_alive);
}

function downloadBar(d) {
  // The model's files coming from the hub: a bar, bytes done of total, rate and time left.
  if (!d) return null;
  const rate = d.rate_bytes_per_s ? `, ${bytes(d.rate_bytes_per_s)}/s` : "";
  const eta = d.eta_s != null && d.eta_s > 0 ? `, ${duration(d.eta_s)} left` : "";
  return el("div", { class: "download" },
    el("progress", { max: String(d.total_bytes || 1), value: String(d.completed_bytes || 0) }),
    el("div", { class: "muted", text: `${bytes(d.completed_bytes)} / ${bytes(d.total_bytes)}${rate}${eta}` }));
}

function renderModels(models) {
  lastModels = models;
  const body = $("#models-body");
  if (!models.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 12, class: "empty", text: "No model is running. Launch one below." })));
    return;
  }
  const rows = [];
  for (const m of models) {
    const replicas = m.replicas.length ? m.replicas : [null];
    replicas.forEach((r, i) => {
      const first = i === 0;
      const span = replicas.length;
      const busy = pending.get(m.model_uid);
      const state = m.status === "downloading" ? "downloading" : r ? r.state : m.status;
      const memory = r ? [r.reserved_bytes, r.estimate_bytes, r.profile_bytes, r.measured_bytes].map(bytes).join(" / ") : "–";
      rows.push(el("tr", { "data-uid": m.model_uid },
        first ? el("td", { rowspan: span }, el("b", { text: m.model_uid })) : null,
        first ? el("td", { rowspan: span, text: m.model_name }) : null,
        first ? el("td", { rowspan: span, text: m.model_type }) : null,
        first ? el("td", { rowspan: span, text: m.model_engine }) : null,
        el("td", { text: r ? "#" + r.index : "–" }),
        el("td", { text: r && r.state === "parked" ? `host RAM (from ${r.parked_from || "–"})` : (r && r.device) || "–" }),
        el("td", {}, el("span", { class: "state " + state, text: state }),
          first && state === "downloading" ? downloadBar(m.download) : null,
          r && r.last_wake_seconds !== null && r.last_wake_seconds !== undefined
            ? el("div", { class: "muted", text: `last wake ${r.last_wake_seconds.toFixed(2)} s, ` +
                `${new Date(r.last_woken * 1000).toLocaleTimeString()}` }) : null,
          r && r.last_error ? el("div", { class: "error", text: r.last_error }) : null),
        el("td", { class: "num", text: memory }),
        el("td", { class: "num", text: r ? String(r.in_flight) : "–" }),
        el("td", { class: "num", text: r ? duration(r.idle_seconds) : "–" }),
        first ? el("td", { rowspan: span, text: keepAliveText(m) }) : null,
        first ? el("td", { rowspan: span, class: "actions" },
          el("button", { type: "button", class: "small danger", "data-action": "stop", "data-uid": m.model_uid,
            disabled: Boolean(busy), text: busy === "stopping…" ? busy : "Stop" }),
          " ",
          el("button", { type: "button", class: "small secondary", "data-action": "relaunch", "data-uid": m.model_uid,
            disabled: Boolean(busy), text: busy === "relaunching…" ? busy : "Relaunch" })) : null));
    });
  }
  body.replaceChildren(...rows);
}

function savedLaunches() {
  try { return JSON.parse(sessionStorage.getItem(LAUNCHES)) || {}; } catch { return {}; }
}

function relaunchBody(m) {
  // The body this tab launched it with, else what the model says about itself.
  const saved = savedLaunches()[m.model_uid];
  if (saved) return saved;
  const body = {
    model_name: m.model_name, model_uid: m.model_uid, model_type: m.model_type, model_engine: m.model_engine,
    model_format: m.model_format, quantization: m.quantization, replica: m.replica || 1,
    pinned: m.pinned, keep_alive: m.keep_alive,
  };
  if (m.model_size_in_billions !== null) body.model_size_in_billions = pySize(m.model_size_in_billions);
  if (m.estimate && m.estimate.declared) body.gpu_memory = m.estimate.declared;
  return body;
}

async function modelAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button || button.disabled) return;
  const uid = button.dataset.uid;
  const model = lastModels.find((m) => m.model_uid === uid);
  const msg = $("#models-msg");
  const action = button.dataset.action;
  pending.set(uid, action === "stop" ? "stopping…" : "relaunching…");
  renderModels(lastModels);
  msg.className = "msg";
  try {
    const body = model && relaunchBody(model);
    await api("/v1/models/" + encodeURIComponent(uid), { method: "DELETE" });
    if (action === "relaunch") {
      msg.textContent = `${uid} stopped; launching it again…`;
      pending.delete(uid);
      poll();
      await api("/v1/models", { method: "POST", json: body });
    }
    msg.textContent = action === "stop" ? `${uid} stopped.` : `${uid} relaunched.`;
    msg.className = "msg ok";
  } catch (err) {
    msg.textContent = `${action} ${uid}: ${err.message}`;
    msg.className = "msg error";
  } finally {
    pending.delete(uid);
    poll();
  }
}

// ---- launch form: catalog → options → estimate (before launching) → launch

// Which engines serve which format (the server's engine registry); the first listed is not the default.
const ENGINE_FORMATS = {
  "llama.cpp": ["ggufv2", "gguf"], llm_rerank: ["ggufv2", "gguf"],
  sentence_transformers: ["sentence_transformers", "pytorch"], embedding_rerank: ["sentence_transformers", "pytorch"],
  cross_encoder: ["cross_encoder", "pytorch", "sentence_transformers"], transformers: ["pytorch", "safetensors"],
  vllm: ["pytorch", "safetensors", "gptq", "awq", "fp8"], faster_whisper: ["ctranslate2"], piper: ["piper"],
  hibari: ["hibari"], rapidocr: ["rapidocr"], diffusers: ["diffusers"],
};
const catalog = {};  // model type -> detailed registrations
let estimateSeq = 0;
let estimateTimer = null;

const form = () => $("#launch-form").elements;

function options(select, items, keep = true) {
  const previous = select.value;
  select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label })));
  if (keep && items.some(([value]) => value === previous)) select.value = previous;
}

async function enterModels() {
  try {
    // The workers only feed the Node picker; without them the form works as on one machine.
    const [devices, workers] = await Promise.all([
      api("/v1/cluster/devices"),
      api("/v1/workers").catch(() => []),
    ]);
    options(form().device, [["auto", "auto (where it fits)"], ["cpu", "CPU"],
      ...devices.filter((d) => d.kind === "gpu").map((d) => [d.id, `${d.id} — ${d.name}, ${bytes(d.free_bytes)} free`])]);
    fillNodes(workers);
    if (!catalog[form().model_type.value]) await loadCatalog(form().model_type.value);
  } catch (err) {
    $("#launch-msg").textContent = err.message;
  }
}

// Ray cluster (a worker with a Ray node id): "any node", then each alive node, by name, sent as
// worker_ip. On one machine ("local", no node id) the field stays hidden and sends nothing.
function fillNodes(workers) {
  const select = form().worker_ip;
  const ray = workers.some((w) => w.node_id);
  const before = select.value;
  $("#node-field").hidden = !ray;
  options(select, [["", "any node"], ...(ray ? workers : [])
    .filter((w) => w.node && w.alive !== false)
    .map((w) => [w.node, w.worker_ip ? `${w.node} (${w.worker_ip})` : w.node])]);
  if (select.value !== before) scheduleEstimate();  // the chosen node left the cluster: back to any
}

async function loadCatalog(type, select) {
  catalog[type] = await api(`/v1/model_registrations/${type}?detailed=true`);
  const names = catalog[type].map((f) => [f.model_name, f.model_name + (f.is_builtin ? "" : " (registered)")]);
  options(form().model_name, names);
  if (select) form().model_name.value = select;
  familyChanged();
}

function currentFamily() {
  return (catalog[form().model_type.value] || []).find((f) => f.model_name === form().model_name.value);
}

function familyChanged() {
  const family = currentFamily();
  const specs = family ? family.model_specs : [];
  options(form().spec, specs.map((s, i) => [String(i),
    [s.model_format, s.model_size_in_billions !== null ? s.model_size_in_billions + "B" : "", s.quantization]
      .filter((x) => x && x !== "none").join(" · ")]), false);
  $("#launch-description").textContent = family ? family.model_description : "";
  specChanged();
}

function specChanged() {
  const family = currentFamily();
  const spec = family && family.model_specs[Number(form().spec.value)];
  const engines = spec ? Object.keys(ENGINE_FORMATS).filter((e) => ENGINE_FORMATS[e].includes(spec.model_format)) : [];
  options(form().model_engine, [["", "default"], ...engines.map((e) => [e, e])]);
  scheduleEstimate();
}

function launchBody() {
  const f = form();
  const hub = f.hub_name.value.trim();
  const family = currentFamily();
  if (!family && !hub) return null;
  let body;
  if (hub) {
    // A hub name: the server reads the repo for its format and kind (rerank must be asked for).
    body = { model_name: hub, replica: Number(f.replica.value) || 1 };
    if (f.model_type.value === "rerank") body.model_type = "rerank";
  } else {
    const spec = family.model_specs[Number(f.spec.value)] || family.model_specs[0];
    body = { model_name: family.model_name, model_type: family.model_type, model_format: spec.model_format,
      quantization: spec.quantization, replica: Number(f.replica.value) || 1 };
    if (spec.model_size_in_billions !== null) body.model_size_in_billions = pySize(spec.model_size_in_billions);
  }
  if (f.model_engine.value) body.model_engine = f.model_engine.value;
  // A cluster's devices carry their node ("node-ab12cd34/gpu:0"): that GPU index on that node.
  const [node, local] = f.device.value.includes("/") ? f.device.value.split("/") : [null, f.device.value];
  if (local === "cpu") body.device = "cpu";
  else if (local.startsWith("gpu:")) body.gpu_idx = Number(local.slice(4));
  if (f.gpu_memory.value.trim()) body.gpu_memory = f.gpu_memory.value.trim();
  if (!$("#node-field").hidden && f.worker_ip.value) body.worker_ip = f.worker_ip.value;
  if (node) body.worker_ip = node;
  return Object.assign(body, engineOptions(f.engine_options.value));
}

// "n_ctx=2048 n_parallel=2" -> {n_ctx: 2048, n_parallel: 2}: engine keyword arguments of the launch.
function engineOptions(text) {
  const result = {};
  for (const pair of text.split(/[\s,]+/).filter(Boolean)) {
    const match = /^([A-Za-z_][\w.]*)=(.*)$/.exec(pair);
    if (!match) throw new Error(`engine option ${JSON.stringify(pair)} is not name=value`);
    const value = match[2];
    result[match[1]] = /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value === "true" ? true : value === "false" ? false : value;
  }
  return result;
}

function scheduleEstimate() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(runEstimate, 250);
}

async function runEstimate() {
  const box = $("#estimate");
  const seq = ++estimateSeq;
  try {
    const body = launchBody();
    if (!body) { box.replaceChildren(); return; }
    box.className = "estimate";
    box.textContent = "estimating…";
    const result = await api("/v1/models/estimate", { method: "POST", json: body });
    if (seq === estimateSeq) renderEstimate(result);
  } catch (err) {
    if (seq === estimateSeq) { box.className = "estimate nofit"; box.textContent = err.message; }
  }
}

function renderEstimate(r) {
  const e = r.estimate;
  const p = r.placement;
  const box = $("#estimate");
  const row = (k, v) => el("tr", {}, el("td", { class: "muted", text: k }), el("td", { class: "num", text: v }));
  const table = el("table", {},
    row("weights", bytes(e.weights) + (e.dtype ? " " + e.dtype : "")),
    row("KV cache", e.kv_cache ? `${bytes(e.kv_cache)} (${e.context_length} tokens × ${e.parallel})` : "none"),
    row("activations", bytes(e.activations)),
    e.cuda_context ? row("CUDA context", bytes(e.cuda_context)) : null,
    e.cpu_runtime ? row("CPU runtime", bytes(e.cpu_runtime)) : null,
    e.memory_source && e.memory_source !== "formula" && e.memory_source !== "declared"
      ? row("formula, per device", bytes(e.formula_per_device)) : null,
    e.profile ? row(e.profile.stale ? "stored profile (stale, not used)" : "measured profile",
      `${bytes(e.profile.reserved_bytes)} (peak ${bytes(e.profile.peak_bytes)})`) : null,
    e.correction ? row("correction from similar models", "× " + e.correction) : null,
    row(e.declared ? "declared, per device" : e.memory_source === "profile" ? "per device (profile)"
      : e.memory_source === "corrected" ? "per device (corrected)" : "total per device", bytes(e.per_device)));
  const head = `${r.model_engine} on ${r.n_devices > 1 ? r.n_devices + " × " : ""}${r.device_kind}`;
  let where;
  if (p.fits) {
    box.className = "estimate fits";
    where = el("div", { class: "where", text: `Would go to ${p.devices.join(", ")}` +
      (p.evict && p.evict.length ? `, after evicting ${p.evict.join(", ")}` : "") });
  } else {
    box.className = "estimate nofit";
    where = el("div", {}, el("div", { class: "where", text: `Does not fit now: ${p.reason}` }), nofitText(p));
  }
  box.replaceChildren(el("div", { class: "muted", text: head }), table, where,
    ...(e.notes || []).map((n) => el("div", { class: "muted", text: "note: " + n })));
}

function nofitText(d) {
  const free = (d.devices || []).map((x) => `${x.device}: ${bytes(x.free_bytes)} free of ${bytes(x.total_bytes)}` +
    (x.evictable_bytes ? `, ${bytes(x.evictable_bytes)} evictable` : "")).join("; ");
  return el("div", { class: "muted", text: `needs ${bytes(d.needed_bytes)} on each of ${d.n_devices} device(s). ` +
    `${free || "no device"}.` + (d.not_evictable && d.not_evictable.length ? ` Held and not evictable: ${d.not_evictable.join(", ")}.` : "") });
}

async function launch(event) {
  event.preventDefault();
  const f = form();
  const msg = $("#launch-msg");
  let body;
  try {
    body = launchBody();
  } catch (err) {
    msg.className = "msg error";
    msg.textContent = err.message;
    return;
  }
  if (!body) return;
  if (f.model_uid.value.trim()) body.model_uid = f.model_uid.value.trim();
  const keepAlive = f.keep_alive.value.trim();
  if (keepAlive) body.keep_alive = /^-?\d+(\.\d+)?$/.test(keepAlive) ? Number(keepAlive) : keepAlive;
  if (f.pinned.checked) body.pinned = true;
  const button = $("#launch-button");
  button.disabled = true;
  button.textContent = "Launching…";
  msg.className = "msg";
  msg.textContent = "Loading the weights; the model shows as loading above until it is ready.";
  setTimeout(poll, 300);
  try {
    const result = await api("/v1/models", { method: "POST", json: body });
    const saved = savedLaunches();
    saved[result.model_uid] = { ...body, model_uid: result.model_uid };
    sessionStorage.setItem(LAUNCHES, JSON.stringify(saved));
    msg.className = "msg ok";
    msg.textContent = `${result.model_uid} is ${result.status}.`;
  } catch (err) {
    msg.className = "msg error";
    msg.textContent = err.message;  // a 507 names the free memory and what holds the rest
  } finally {
    button.disabled = false;
    button.textContent = "Launch";
    poll();
    scheduleEstimate();
  }
}

async function register(event) {
  event.preventDefault();
  const f = event.target.elements;
  const type = f.model_type.value;
  const spec = { model_format: f.model_format.value, model_uri: f.model_uri.value.trim(),
    quantization: f.quantization.value.trim() || "none" };
  if (f.size.value) spec.model_size_in_billions = Number(f.size.value);
  const model = { model_name: f.model_name.value.trim(), model_type: type, model_specs: [spec] };
  if (f.context_length.value) model.context_length = Number(f.context_length.value);
  if (type === "LLM") model.model_ability = f.chat.checked ? ["chat", "generate"] : ["generate"];
  const msg = $("#register-msg");
  msg.className = "msg";
  try {
    const result = await api(`/v1/model_registrations/${type}`, { method: "POST", json: { model, persist: true } });
    msg.className = "msg ok";
    msg.textContent = `Registered ${result.model_name}; it is selected in the launch form.`;
    form().model_type.value = type;
    await loadCatalog(type, result.model_name);
  } catch (err) {
    msg.className = "msg error";
    msg.textContent = err.message;
  }
}

// ---------------------------------------------------------------- Playground

let modelsSignature = "";

function fillModelSelects(models) {
  const signature = JSON.stringify(models.map((m) => [m.model_uid, m.status, m.model_ability]));
  if (signature === modelsSignature) return;
  modelsSignature = signature;
  for (const select of document.querySelectorAll("select.model-select")) {
    const able = models.filter((m) => m.model_ability.includes(select.dataset.ability));
    const before = select.value;
    options(select, able.length
      ? able.map((m) => [m.model_uid, m.model_uid + (m.status === "ready" ? "" : ` (${m.status})`)])
      : [["", `no ${select.dataset.ability} model running — launch one on the Models page`]]);
    if (select.id === "speech-model" && select.value !== before) loadVoices();
  }
}

function showTab(name) {
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.dataset.panel !== name;
}

function bubble(role, text) {
  const node = el("div", { class: "bubble " + role, text });
  const log = $("#chat-log");
  log.append(node);
  log.scrollTop = log.scrollHeight;
  return node;
}

// Server-sent events from a fetch() body: yields each event's data.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

const chat = { history: [], abort: null };

async function sendChat(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  const model = $("#chat-model").value;
  if (!text || !model || chat.abort) return;
  input.value = "";
  chat.history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant streaming", "");
  const system = $("#chat-system").value.trim();
  const body = { model, stream: true, max_tokens: Number($("#chat-max").value) || 256,
    temperature: Number($("#chat-temp").value),
    messages: [...(system ? [{ role: "system", content: system }] : []), ...chat.history] };
  chat.abort = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").hidden = false;
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let reply = "";
  try {
    const response = await api("/v1/chat/completions", { method: "POST", json: body, raw: true, signal: chat.abort.signal });
    if (!response.ok) throw await errorOf(response);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (delta) {
        if (first === null) first = performance.now() - started;
        pieces += 1;
        reply += delta;
        out.textContent = reply;
        $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
      }
    }
    chat.history.push({ role: "assistant", content: reply });
    const seconds = (performance.now() - started) / 1000;
    $("#chat-stats").textContent = `${pieces} chunks in ${seconds.toFixed(1)} s` +
      (first !== null ? `, first after ${Math.round(first)} ms` : "");
  } catch (err) {
    if (err.name === "AbortError") {
      chat.history.push({ role: "assistant", content: reply });
      out.textContent = reply + " [stopped]";
    } else {
      chat.history.pop();
      out.className = "bubble error";
      out.textContent = err.message;
    }
  } finally {
    out.classList.remove("streaming");
    chat.abort = null;
    $("#chat-send").disabled = false;
    $("#chat-stop").hidden = true;
  }
}

async function runPanel(outId, work) {
  const out = $(outId);
  out.replaceChildren(el("span", { class: "muted", text: "working…" }));
  try {
    out.replaceChildren(...[].concat(await work()));
  } catch (err) {
    out.replaceChildren(el("div", { class: "error", text: err.message }));
  }
}

const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);

async function embed() {
  const sentences = lines("#embed-input");
  const result = await api("/v1/embeddings", { method: "POST", json: { model: $("#embed-model").value, input: sentences } });
  const vectors = result.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
  const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  const cosine = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0) / (norm(a) * norm(b));
  const head = el("tr", {}, el("th"), ...sentences.map((_, i) => el("th", { text: "#" + (i + 1) })));
  const rows = sentences.map((s, i) => el("tr", {}, el("th", { text: `#${i + 1} ${s}` }),
    ...sentences.map((_, j) => {
      const c = cosine(vectors[i], vectors[j]);
      return el("td", { text: c.toFixed(2), style: `background:hsl(210 70% ${96 - Math.max(0, c) * 50}%);color:${c > 0.6 ? "#fff" : "inherit"}` });
    })));
  return [el("p", { class: "muted", text: `${vectors[0].length} dimensions; cosine similarity:` }),
    el("table", { class: "sim" }, head, ...rows)];
}

async function rerank() {
  const documents = lines("#rerank-docs");
  const result = await api("/v1/rerank", { method: "POST", json: {
    model: $("#rerank-model").value, query: $("#rerank-query").value, documents, return_documents: true } });
  const scores = result.results.map((r) => r.relevance_score);
  const top = Math.max(...scores.map(Math.abs), 1e-9);
  return result.results.map((r, rank) => el("div", { class: "rank" },
    el("b", { text: "#" + (rank + 1) }),
    el("div", { class: "scorebar" }, el("i", { style: `width:${(Math.max(0, r.relevance_score) / top) * 100}%` })),
    el("span", { class: "num", text: r.relevance_score.toFixed(4) }),
    el("span", { text: documents[r.index] })));
}

async function loadVoices() {
  const model = $("#speech-model").value;
  if (!model) { options($("#speech-voice"), []); return; }
  try {
    const result = await api("/v1/audio/voices?model=" + encodeURIComponent(model));
    options($("#speech-voice"), [["", "default"], ...result.voices.map((v) => [v.id, v.name || v.id])]);
  } catch {
    options($("#speech-voice"), [["", "default"]]);
  }
}

let lastSpeech = null;

async function speak() {
  const body = { model: $("#speech-model").value, input: $("#speech-input").value, response_format: "wav",
    speed: Number($("#speech-speed").value) || 1 };
  if ($("#speech-voice").value) body.voice = $("#speech-voice").value;
  const response = await api("/v1/audio/speech", { method: "POST", json: body, raw: true });
  if (!response.ok) throw await errorOf(response);
  lastSpeech = await response.blob();
  $("#transcribe-last").hidden = false;
  const url = URL.createObjectURL(lastSpeech);
  const audio = el("audio", { controls: true, src: url });
  audio.play().catch(() => { /* autoplay may be refused; the controls remain */ });
  return [audio, el("div", {}, el("a", { href: url, download: "speech.wav", text: `download (${bytes(lastSpeech.size)})` }))];
}

async function transcribe(blob, name) {
  if (!blob) throw new Error("choose an audio file first");
  const data = new FormData();
  data.append("model", $("#transcribe-model").value);
  data.append("file", blob, name);
  if ($("#transcribe-lang").value.trim()) data.append("language", $("#transcribe-lang").value.trim());
  const started = performance.now();
  const result = await api("/v1/audio/transcriptions", { method: "POST", body: data });
  return [el("blockquote", { text: typeof result === "string" ? result : result.text }),
    el("p", { class: "muted", text: `${name}, ${((performance.now() - started) / 1000).toFixed(1)} s` })];
}

// ---------------------------------------------------------------- wiring

function init() {
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", poll);
  setInterval(poll, POLL_MS);
  $("#devices").addEventListener("mousemove", showTip);
  $("#devices").addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
  $("#key-button").addEventListener("click", () => {
    if (sessionStorage.getItem(KEY)) { sessionStorage.removeItem(KEY); showKeyButton(); poll(); }
    else askKey("Enter the API key for this server.").then(poll);
  });

  $("#models-body").addEventListener("click", modelAction);
  const f = form();
  f.model_type.addEventListener("change", () => loadCatalog(f.model_type.value).catch((e) => { $("#launch-msg").textContent = e.message; }));
  f.model_name.addEventListener("change", familyChanged);
  f.spec.addEventListener("change", specChanged);
  for (const name of ["model_engine", "replica", "worker_ip", "device", "gpu_memory", "engine_options"]) {
    f[name].addEventListener("input", scheduleEstimate);
    f[name].addEventListener("change", scheduleEstimate);
  }
  f.hub_name.addEventListener("change", scheduleEstimate);  // on change, not per keystroke: it asks the hub
  $("#launch-form").addEventListener("submit", launch);
  $("#register-form").addEventListener("submit", register);

  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-stop").addEventListener("click", () => chat.abort && chat.abort.abort());
  $("#chat-clear").addEventListener("click", () => { chat.history = []; $("#chat-log").replaceChildren(); $("#chat-stats").textContent = ""; });
  $("#embed-run").addEventListener("click", () => runPanel("#embed-out", embed));
  $("#rerank-run").addEventListener("click", () => runPanel("#rerank-out", rerank));
  $("#speech-model").addEventListener("change", loadVoices);
  $("#speech-run").addEventListener("click", () => runPanel("#speech-out", speak));
  $("#transcribe-run").addEventListener("click", () => {
    const file = $("#transcribe-file").files[0];
    runPanel("#transcribe-out", () => transcribe(file, file && file.name));
  });
  $("#transcribe-last").addEventListener("click", () => runPanel("#transcribe-out", () => transcribe(lastSpeech, "speech.wav")));

  showKeyButton();
  route();
}

init();
