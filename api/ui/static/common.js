// The dashboard's shared pieces: the session's API key, calls to the /v1 API, problem
// messages, and small DOM helpers. API data only ever reaches the page as textContent.
"use strict";

const SVD = (() => {
  const STORE = "svdforge.apiKey";
  const API = document.body.dataset.api;
  const UI = document.body.dataset.ui;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  let pageInit = null;
  let started = false;

  const getKey = () => sessionStorage.getItem(STORE);

  class Problem extends Error {
    constructor(status, doc) {
      const title = (doc && doc.title) || `HTTP ${status}`;
      const detail = doc && doc.detail;
      super(detail ? `${title}: ${detail}` : title);
      this.status = status;
      this.doc = doc || {};
    }
  }

  // An API path from a URL the API gave (absolute or not); anything off this origin's /v1 is refused.
  function apiPath(url) {
    const u = new URL(url, window.location.href);
    if (u.origin !== window.location.origin || !u.pathname.startsWith(API + "/")) {
      throw new Problem(0, { title: "Refused", detail: `not an API URL of this server: ${url}` });
    }
    return u.pathname + u.search;
  }

  async function problemOf(resp) {
    let doc = null;
    try {
      doc = await resp.json();
    } catch (e) {
      doc = { title: resp.statusText || `HTTP ${resp.status}` };
    }
    return new Problem(resp.status, doc);
  }

  // fetch() one API path with the session's key; JSON back unless `raw`. Non-2xx throws a Problem.
  async function api(path, opts = {}) {
    const key = opts.key || getKey();
    const headers = { Authorization: `Bearer ${key}`, ...(opts.headers || {}) };
    let body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let resp;
    try {
      resp = await fetch(apiPath(path), {
        method: opts.method || "GET", headers, body, cache: "no-store",
        credentials: "omit", redirect: "error", signal: opts.signal,
      });
    } catch (e) {
      if (e instanceof Problem || e.name === "AbortError") throw e;
      throw new Problem(0, { title: "Network error", detail: "the server could not be reached" });
    }
    if (resp.status === 401 && !opts.key) {
      signOut();
      showSignin(await problemOf(resp));
    }
    if (!resp.ok) throw await problemOf(resp);
    return opts.raw ? resp : resp.json();
  }

  // A problem document as text: "title: detail", then one line per field error.
  function showProblem(el, err) {
    clear(el);
    if (!err) {
      el.hidden = true;
      return;
    }
    const head = document.createElement("p");
    head.textContent = err instanceof Problem ? err.message : String(err.message || err);
    el.appendChild(head);
    const detail = err.doc && err.doc.detail;
    const issues = ((err.doc && Array.isArray(err.doc.errors)) ? err.doc.errors : [])
      .filter((issue) => !(detail || "").includes(`${issue.field}: ${issue.message}`));  // not said twice
    if (issues.length) {
      const ul = document.createElement("ul");
      for (const issue of issues) {
        ul.appendChild(el_("li", {}, `${issue.field}: ${issue.message}`));
      }
      el.appendChild(ul);
    }
    el.hidden = false;
  }

  const pageProblem = (err) => showProblem(document.getElementById("problem"), err);

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  // document.createElement with attributes and children (strings become text nodes).
  function el_(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return e;
  }

  function age(iso) {
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h`;
    return `${Math.floor(s / 86400)} d`;
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
  }

  function ratioOf(request) {
    if (!request) return "";
    if (Array.isArray(request.ratios)) return request.ratios.join(", ");
    return request.ratio === null || request.ratio === undefined ? "" : String(request.ratio);
  }

  function statusBadge(status) {
    return el_("span", { class: `status status-${status}` }, status);
  }

  // A job's live progress: the running stage and its fraction (a <progress> bar and a label).
  function progressCell(job) {
    const done = job.status === "succeeded";
    const value = done ? 1 : (job.progress || 0);
    const bar = el_("progress", { max: "1", value: String(value) });
    const label = TERMINAL.has(job.status) ? (done ? "done" : "") : `${job.stage || "waiting"} ${Math.round(value * 100)} %`;
    return el_("span", { class: "progress" }, bar, " ", label);
  }

  // Server-Sent Events: the complete frames at the front of `buffer` (blank-line separated;
  // `id:`, `event:`, `data:` lines, `:` comments) and the incomplete rest, kept for the next chunk.
  function sseFrames(buffer) {
    const hold = buffer.endsWith("\r") ? "\r" : "";  // maybe the first half of a \r\n split between chunks
    const text = buffer.slice(0, buffer.length - hold.length).replace(/\r\n?/g, "\n");
    const frames = [];
    let start = 0;
    let cut;
    while ((cut = text.indexOf("\n\n", start)) >= 0) {
      const frame = { id: null, event: "message", data: [] };
      for (const line of text.slice(start, cut).split("\n")) {
        if (line === "" || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") frame.data.push(value);
        else if (field === "id") frame.id = value;
        else if (field === "event") frame.event = value;
      }
      if (frame.data.length) frames.push({ id: frame.id, event: frame.event, data: frame.data.join("\n") });
      start = cut + 2;
    }
    return { frames, rest: text.slice(start) + hold };
  }

  // A random id (crypto.randomUUID needs a secure context; getRandomValues does not).
  function randomId() {
    return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function signOut() {
    sessionStorage.removeItem(STORE);
  }

  function showWho() {
    const key = getKey();
    document.getElementById("who").hidden = !key;
    document.getElementById("who-key").textContent = key ? `key ${key.slice(0, 12)}…` : "";
  }

  function showSignin(err) {
    document.getElementById("main").hidden = true;
    document.getElementById("signin-panel").hidden = false;
    showProblem(document.getElementById("signin-problem"), err || null);
    showWho();
    document.getElementById("signin-key").focus();
  }

  function start() {
    document.getElementById("signin-panel").hidden = true;
    document.getElementById("main").hidden = false;
    showWho();
    if (!started && pageInit) {
      started = true;
      pageInit();
    }
  }

  async function signIn(event) {
    event.preventDefault();
    const input = document.getElementById("signin-key");
    const key = input.value.trim();
    const problemEl = document.getElementById("signin-problem");
    if (!key) {
      showProblem(problemEl, new Problem(0, { title: "Sign in", detail: "paste an API key" }));
      return;
    }
    try {
      await api(`${API}/jobs?limit=1`, { key });  // checks the key before keeping it
    } catch (err) {
      showProblem(problemEl, err);
      return;
    }
    sessionStorage.setItem(STORE, key);
    input.value = "";
    if (started) window.location.reload();  // the key changed under a page that had started
    else start();
  }

  // Each page's script registers what it does once a key is there.
  function page(init) {
    pageInit = init;
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("signin-form").addEventListener("submit", signIn);
    document.getElementById("signout").addEventListener("click", () => {
      signOut();
      window.location.assign(UI);
    });
    if (getKey()) start();
    else showSignin(null);
  });

  return {
    API, UI, TERMINAL, Problem, api, apiPath, showProblem, pageProblem, clear, el: el_, age, bytes,
    ratioOf, statusBadge, progressCell, randomId, sseFrames, sleep, page,
  };
})();
