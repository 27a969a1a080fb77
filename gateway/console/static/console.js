// fnbox console: small progressive enhancements. Every page works as plain HTML; this adds the editor, the
// fetch() actions with progress, the live tail (Server-Sent Events) and local times. No inline script anywhere.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const csrf = () => ($('meta[name="csrf-token"]') || {}).content || "";

function fmtMs(v) {
  if (v === null || v === undefined) return "—";
  if (v >= 1000) return (v / 1000).toFixed(2) + " s";
  return v >= 10 ? v.toFixed(1) + " ms" : v.toFixed(2) + " ms";
}
function fmtKib(v) { return v === null || v === undefined ? "—" : (v / 1024).toFixed(1) + " MiB"; }
function outcomeClass(o) { return o === "ok" ? "ok" : ["busy", "unavailable", "not_found"].includes(o) ? "warn" : "bad"; }
function localTime(el) {
  const d = new Date(el.getAttribute("datetime"));
  if (!isNaN(d)) { el.title = el.textContent; el.textContent = d.toLocaleString(); }
}

// A button that shows progress while `work` runs, and cannot be pressed twice.
async function busy(btn, work) {
  if (!btn) return work();
  const label = btn.innerHTML;
  btn.disabled = true;
  btn.classList.add("busy");
  if (btn.dataset.busy) btn.textContent = btn.dataset.busy;
  btn.setAttribute("aria-busy", "true");
  try { return await work(); } finally {
    btn.disabled = false; btn.classList.remove("busy"); btn.innerHTML = label; btn.removeAttribute("aria-busy");
  }
}

async function postJSON(url, doc) {
  const resp = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), "Accept": "application/json" },
    body: JSON.stringify(doc),
  });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: "bad_response", message: "HTTP " + resp.status }; }
  if (resp.status === 401) { location.href = "/console/login?next=" + encodeURIComponent(location.pathname); }
  return { status: resp.status, body };
}

// -- editor: line numbers, Tab, Ctrl+Enter, error line --------------------------------------------------------
function setupEditor(wrap) {
  const ta = $("textarea", wrap), gutter = $(".gutter", wrap);
  let errLine = null;
  const render = () => {
    const n = ta.value.split("\n").length;
    gutter.textContent = "";
    for (let i = 1; i <= n; i++) {
      if (i === errLine) { const s = document.createElement("span"); s.className = "err"; s.textContent = i; gutter.append(s); }
      else gutter.append(String(i));
      if (i < n) gutter.append("\n");
    }
    gutter.scrollTop = ta.scrollTop;
  };
  ta.addEventListener("input", () => { errLine = null; render(); });
  ta.addEventListener("scroll", () => { gutter.scrollTop = ta.scrollTop; });
  ta.addEventListener("keydown", (e) => {
    if (e.key === "Tab" && !e.shiftKey && !e.ctrlKey && !e.metaKey && !e.altKey) {
      // Indent; Esc first releases the focus trap so the keyboard can leave the editor.
      if (wrap.dataset.escaped === "1") { wrap.dataset.escaped = ""; return; }
      e.preventDefault();
      const s = ta.selectionStart;
      ta.setRangeText("    ", s, ta.selectionEnd, "end");
      render();
    } else if (e.key === "Escape") { wrap.dataset.escaped = "1"; }
  });
  wrap.markError = (line) => {
    errLine = line || null;
    render();
    if (!line) return;
    const lines = ta.value.split("\n");
    let start = 0;
    for (let i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
    ta.focus();
    ta.setSelectionRange(start, start + (lines[line - 1] || "").length);
    const lh = parseFloat(getComputedStyle(ta).lineHeight) || 20;
    ta.scrollTop = Math.max(0, (line - 4) * lh);
    gutter.scrollTop = ta.scrollTop;
  };
  wrap.setValue = (v) => { ta.value = v; errLine = null; render(); };
  render();
  return wrap;
}

// -- request builder ----------------------------------------------------------------------------------------
function requestDoc(form) {
  const fd = new FormData(form);
  return { method: fd.get("method"), path: fd.get("path") || "", query: fd.get("query") || "",
           headers: fd.get("headers") || "", body: fd.get("body") || "", body_kind: fd.get("body_kind") || "raw" };
}

function showResult(box, r) {
  box.hidden = false;
  const set = (k, v) => { const el = $(`[data-r="${k}"]`, box); if (el) el.textContent = v == null ? "" : v; };
  const pill = $('[data-r="outcome"]', box);
  pill.className = "pill " + outcomeClass(r.outcome);
  set("outcome", r.outcome || "—");
  const st = $('[data-r="status"]', box);
  st.className = "status s" + Math.floor((r.status || 0) / 100);
  set("status", r.status || "");
  set("message", r.outcome === "ok" ? "" : (r.message || ""));
  set("time", fmtMs(r.wall_ms !== undefined ? r.wall_ms : r.duration_ms));
  set("cpu", fmtMs(r.cpu_ms));
  let mem = fmtKib(r.max_rss_kb);
  if (r.limits) mem += " of " + r.limits.memory_mb + " MiB";
  set("memory", mem);
  set("rid", r.request_id || "");
  let body = r.body || "";
  try { if (body.trim().startsWith("{") || body.trim().startsWith("[")) body = JSON.stringify(JSON.parse(body), null, 2); } catch (e) { /* not JSON */ }
  set("body", body || "(empty)");
  set("headers", (r.headers || []).map((h) => h[0] + ": " + h[1]).join("\n"));
  set("output", r.output || "");
  $('[data-r="output-wrap"]', box).hidden = !r.output;
  set("traceback", r.traceback || "");
  $('[data-r="tb-wrap"]', box).hidden = !r.traceback;
}

function showError(el, body, editor) {
  let msg = body.message || body.error || "failed";
  if (body.line) msg = `Line ${body.line}: ${msg}`;
  el.textContent = msg;
  el.hidden = false;
  if (editor && editor.markError) editor.markError(body.line);
}

// -- pages -----------------------------------------------------------------------------------------------------
function setupFunctionPage() {
  const editBtn = $("#edit-btn"), panel = $("#edit-panel"), view = $("#source-view");
  const editor = $("#edit-panel [data-editor]");
  if (editBtn && panel) {
    setupEditor(editor);
    const open = (on) => {
      panel.hidden = !on; view.hidden = on; editBtn.setAttribute("aria-expanded", String(on));
      editBtn.hidden = on;
      if (on) { $("textarea", editor).focus(); editor.markError(null); }
    };
    editBtn.addEventListener("click", () => open(true));
    $("#cancel-edit").addEventListener("click", () => { open(false); editBtn.focus(); });
    const deployBtn = $("#deploy-btn"), err = $("#deploy-error");
    const deploy = () => busy(deployBtn, async () => {
      err.hidden = true;
      const { status, body } = await postJSON(deployBtn.dataset.deploy, { source: $("textarea", editor).value });
      if (status === 201) { location.href = body.url; return; }
      showError(err, body, editor);
    });
    deployBtn.addEventListener("click", deploy);
    $("textarea", editor).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); deploy(); }
    });
  }
  const form = $("#invoke-form");
  if (form) {
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      busy($('button[type="submit"]', form), async () => {
        const { status, body } = await postJSON(form.dataset.invoke, requestDoc(form));
        if (status !== 200) body.outcome = body.error;
        showResult($("#invoke-result"), body);
      });
    });
  }
}

const EXAMPLES = {
  hello: 'def main(request):\n    name = request.args.get("name", "World")\n    return {"hello": name}\n',
  json: 'def main(request):\n    data = request.get_json(silent=True) or {}\n    return {"you_sent": data, "method": request.method}\n',
  print: 'import os\n\n\ndef main(request):\n    print("headers:", dict(request.headers))\n    print("env:", sorted(os.environ))\n    return "look at the output"\n',
  timeout: 'def main(request):\n    while True:  # the strict profile stops this after its timeout\n        pass\n',
  memory: 'def main(request):\n    hog = []\n    while True:  # over memory_mb: the call is killed\n        hog.append(bytearray(8 * 1024 * 1024))\n',
  crash: 'import os\n\n\ndef main(request):\n    os._exit(3)  # the process dies without answering\n',
  error: 'def main(request):\n    return {"x": 1 / 0}\n',
};

function setupPlayground() {
  const form = $("#play-form");
  if (!form) return;
  const editor = setupEditor($(".play [data-editor]"));
  const ta = $("textarea", editor), err = $("#play-error"), box = $("#play-result");
  $("#example").addEventListener("change", (e) => { editor.setValue(EXAMPLES[e.target.value] || ""); ta.focus(); });
  const run = () => busy($("#run-btn"), async () => {
    err.hidden = true;
    const doc = Object.assign(requestDoc(form), { source: ta.value });
    const { status, body } = await postJSON(form.dataset.run, doc);
    if (status !== 200) { showError(err, body, editor); return; }
    $("#play-placeholder").hidden = true;
    showResult(box, body);
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
  ta.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } });
  const save = $("#save-form");
  if (save) {
    save.addEventListener("submit", (e) => {
      e.preventDefault();
      busy($("button", save), async () => {
        const msg = $("#save-msg");
        const { status, body } = await postJSON(save.dataset.save, { name: $("#save-name").value, source: ta.value });
        msg.hidden = false;
        msg.replaceChildren();
        if (status === 201) {
          msg.className = "small rate ok";
          const a = document.createElement("a");
          a.href = body.url; a.textContent = `${body.function} v${body.version}`;
          msg.append("Deployed ", a, ".");
        } else { msg.className = "small bad"; msg.textContent = (body.line ? `Line ${body.line}: ` : "") + body.message; if (body.line) editor.markError(body.line); }
      });
    });
  }
}

function setupFilter() {
  const input = $("input[data-filter]");
  if (!input) return;
  const table = $(input.dataset.filter);
  const apply = () => {
    const q = input.value.trim().toLowerCase();
    let shown = 0;
    $$("tbody tr", table).forEach((tr) => { const hit = !q || tr.dataset.name.toLowerCase().includes(q); tr.hidden = !hit; shown += hit; });
    const none = $(".empty-filter"); if (none) none.hidden = shown > 0;
  };
  input.addEventListener("input", apply);
  input.form.addEventListener("submit", (e) => e.preventDefault());
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && !["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) { e.preventDefault(); input.focus(); }
  });
  apply();
}

function setupLiveTail() {
  const btn = $("#live-btn");
  if (!btn) return;
  const tbody = $("#calls-table tbody"), tpl = $("#call-row"), status = $("#live-status");
  let source = null, after = btn.dataset.after;
  const addRow = (c) => {
    const tr = tpl.content.firstElementChild.cloneNode(true);
    const q = (k) => $(`[data-c="${k}"]`, tr);
    q("link").href = "/console/calls/" + encodeURIComponent(c.request_id) +
      (c.board && c.board !== btn.dataset.board ? "?board=" + encodeURIComponent(c.board) : "");
    const bc = q("board"); if (bc) bc.textContent = c.board || "";
    const t = q("time"); t.setAttribute("datetime", new Date(c.time * 1000).toISOString()); t.textContent = new Date(c.time * 1000).toLocaleString();
    q("fnlink").href = "/console/functions/" + encodeURIComponent(c.function); q("fnlink").textContent = c.function;
    q("version").textContent = c.version ? "v" + c.version : "";
    q("req").textContent = (c.trigger && c.trigger !== "sync" ? "[" + c.trigger + "] " : "") + c.method + " " + c.path;
    q("status").textContent = c.status; q("status").classList.add("s" + Math.floor((c.status || 0) / 100));
    q("outcome").textContent = c.outcome; q("outcome").classList.add(outcomeClass(c.outcome));
    q("duration").textContent = fmtMs(c.duration_ms); q("cpu").textContent = fmtMs(c.cpu_ms); q("mem").textContent = fmtKib(c.max_rss_kb);
    tr.dataset.id = c.id; tr.dataset.board = c.board || "";
    tbody.prepend(tr);
    const none = $("#no-calls"); if (none) none.hidden = true;
    while (tbody.rows.length > 200) tbody.deleteRow(-1);
  };
  const stop = () => { if (source) source.close(); source = null; btn.setAttribute("aria-pressed", "false"); $(".label", btn).textContent = "Live tail"; status.hidden = true; };
  const start = () => {
    const url = new URL(btn.dataset.stream, location.href);
    url.searchParams.set("after", after);
    source = new EventSource(url);
    btn.setAttribute("aria-pressed", "true"); $(".label", btn).textContent = "Live";
    status.hidden = false; status.textContent = "Connecting…";
    source.addEventListener("open", () => { status.textContent = "Live: new calls appear at the top."; });
    source.addEventListener("call", (e) => { const c = JSON.parse(e.data); after = e.lastEventId || c.id; addRow(c); });
    source.addEventListener("error", () => { status.textContent = "Reconnecting…"; });
  };
  btn.addEventListener("click", () => (source ? stop() : start()));
  if (new URLSearchParams(location.search).get("live") === "1") start();
}

function setupBusyForms() {
  // Plain forms (rollback, sign in): show progress and stop double submits.
  $$("form").forEach((f) => {
    if (f.dataset.invoke || f.dataset.run || f.dataset.save || f.getAttribute("role") === "search") return;
    f.addEventListener("submit", () => { const b = $('button[type="submit"][data-busy]', f); if (b) { setTimeout(() => { b.disabled = true; b.classList.add("busy"); }, 0); } });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $$("time[data-local]").forEach(localTime);
  setupFunctionPage();
  setupPlayground();
  setupFilter();
  setupLiveTail();
  setupBusyForms();
  const notice = $("#notice"); if (notice) notice.focus();
});
