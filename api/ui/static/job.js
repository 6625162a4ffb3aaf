// One job: live stages and events, then its report (metrics, figures, samples) and artifacts.
// Live updates poll GET /v1/jobs/{id} and the events list (?after=<last id>) every second;
// the events are first asked for as a Server-Sent Events stream (read with fetch(), which,
// unlike EventSource, sends the Authorization header), and polled when the answer is not one.
"use strict";

(() => {
  const JOB_ID = document.body.dataset.jobId;
  const JOB_PATH = `${SVD.API}/jobs/${encodeURIComponent(JOB_ID)}`;
  const MAX_EVENTS_SHOWN = 500;
  let lastEvent = 0;        // the numeric part of the last event id seen
  let streaming = false;    // an SSE stream is delivering the events
  const streamAbort = new AbortController();
  const figureUrls = [];

  const byId = (id) => document.getElementById(id);
  const fmt = (v, digits = 4) => (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString("en") : v.toPrecision(digits)) : String(v));
  const seconds = (s) => (s ? `${s.toFixed(s < 10 ? 2 : 1)} s` : "");

  // --- the job ------------------------------------------------------------------------
  function renderFacts(job) {
    const r = job.request || {};
    const facts = [
      ["model", job.model], ["ratio", SVD.ratioOf(r)], ["method", r.method], ["allocation", r.allocation],
      ["adapter", r.adapter && r.adapter.type], ["calibration", r.calibration && r.calibration.source],
      ["evaluation", r.evaluation && r.evaluation.source], ["created", `${job.created_at} (${SVD.age(job.created_at)} ago)`],
      ["started", job.started_at], ["finished", job.finished_at], ["attempt", String(job.attempt)],
    ];
    for (const [k, v] of Object.entries(job.metadata || {})) facts.push([`metadata.${k}`, v]);
    const dl = byId("job-facts");
    SVD.clear(dl);
    for (const [k, v] of facts) {
      if (v === null || v === undefined || v === "") continue;
      dl.appendChild(SVD.el("div", {}, SVD.el("dt", {}, k), SVD.el("dd", {}, v)));
    }
  }

  function renderStages(job) {
    const body = byId("stages-body");
    SVD.clear(body);
    for (const st of job.stages) {
      const value = st.status === "completed" ? 1 : st.progress;
      body.appendChild(SVD.el("tr", { dataset: { stage: st.name, status: st.status } },
        SVD.el("td", {}, st.name), SVD.el("td", {}, SVD.statusBadge(st.status)),
        SVD.el("td", {}, SVD.el("progress", { max: "1", value: String(value) }), ` ${Math.round(value * 100)} %`),
        SVD.el("td", {}, seconds(st.seconds))));
    }
  }

  function renderJob(job) {
    const status = byId("job-status");
    SVD.clear(status);
    status.appendChild(SVD.statusBadge(job.status));
    status.dataset.status = job.status;
    renderFacts(job);
    renderStages(job);
    const cancel = byId("cancel");
    cancel.hidden = SVD.TERMINAL.has(job.status);
    cancel.disabled = job.status === "cancelling";
    cancel.textContent = job.status === "cancelling" ? "Cancelling…" : "Cancel job";
    const errorCard = byId("job-error");
    SVD.clear(errorCard);
    errorCard.hidden = !job.error;
    if (job.error) {
      errorCard.appendChild(SVD.el("h2", {}, `Failed: ${job.error.code}${job.error.stage ? ` (stage ${job.error.stage})` : ""}`));
      errorCard.appendChild(SVD.el("p", {}, job.error.message));
    }
  }

  async function cancel() {
    byId("cancel").disabled = true;
    try {
      renderJob(await SVD.api(`${JOB_PATH}/cancel`, { method: "POST" }));
      SVD.pageProblem(null);
    } catch (err) {
      SVD.pageProblem(err);
      byId("cancel").disabled = false;
    }
  }

  // --- events -------------------------------------------------------------------------
  function addEvents(events) {
    const list = byId("events");
    for (const e of events) {
      const n = Number(String(e.id).replace(/^evt_/, ""));
      if (!(n > lastEvent)) continue;  // already shown (a stream and a poll may overlap)
      lastEvent = n;
      const when = new Date(e.created_at).toLocaleTimeString();
      const data = e.data && e.type === "progress" && typeof e.data.fraction === "number"
        ? ` ${Math.round(e.data.fraction * 100)} %` : "";
      list.appendChild(SVD.el("li", { class: `event level-${e.level}`, dataset: { type: e.type } },
        SVD.el("time", { datetime: e.created_at }, when), " ", SVD.el("b", {}, e.type),
        e.stage ? ` [${e.stage}]` : "", e.message ? ` ${e.message}` : "", data));
    }
    while (list.children.length > MAX_EVENTS_SHOWN) list.removeChild(list.firstChild);
  }

  const eventsPath = () => `${JOB_PATH}/events?${new URLSearchParams({ limit: "1000", ...(lastEvent ? { after: `evt_${lastEvent}` } : {}) })}`;

  async function pollEvents() {
    for (let i = 0; i < 20; i += 1) {
      const page = await SVD.api(eventsPath());
      addEvents(page.data);
      if (!page.has_more) return;
    }
  }

  // Server-Sent Events read from a fetch() body; each message's data is one event object.
  async function readStream(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const { frames, rest } = SVD.sseFrames(buffer + value);
      buffer = rest;
      addEvents(frames.map((f) => JSON.parse(f.data)));
    }
  }

  async function tryStream() {
    streaming = true;
    byId("live-note").textContent = "Live: following the event stream.";
    try {
      const resp = await SVD.api(eventsPath(), { raw: true, headers: { Accept: "text/event-stream" }, signal: streamAbort.signal });
      if ((resp.headers.get("content-type") || "").startsWith("text/event-stream")) await readStream(resp.body);
      else addEvents((await resp.json()).data);  // a JSON page: this server polls
    } catch (err) {
      // the stream broke or was stopped: polling carries on from the last event seen
    } finally {
      streaming = false;
      byId("live-note").textContent = "Live: polling every second.";
    }
  }

  // --- the report ---------------------------------------------------------------------
  const get = (o, ...path) => path.reduce((v, k) => (v === null || v === undefined ? undefined : v[k]), o);
  const METRIC_ROWS = [
    ["perplexity", (r, s) => get(r, "metrics", s, "ppl")],
    ["NLL (nats/token)", (r, s) => get(r, "metrics", s, "nll")],
    ["teacher KL (nats)", (r, s) => (s === "dense" ? undefined : get(r, "metrics", s, "teacher_kl"))],
    ["top-10 recall", (r, s) => (s === "dense" ? undefined : get(r, "metrics", s, "top10_recall"))],
    ["top-1 agreement (%)", (r, s) => (s === "dense" ? undefined : get(r, "metrics", s, "agreement"))],
    ["evaluated tokens", (r, s) => get(r, "metrics", s, "tokens")],
    ["parameters", (r, s) => get(r, "params", s)],
    ["linear parameters", (r, s) => get(r, "params", s === "dense" ? "linears_dense" : "linears_compressed")],
    ["weights (bytes)", (r, s) => get(r, "bytes", s)],
    ["FLOPs per token", (r, s) => get(r, "flops_per_token", s)],
    ["tokens/s", (r, s) => get(r, "throughput", s, "tokens_per_s")],
  ];

  function renderMetrics(report) {
    const sweep = Array.isArray(get(report, "sweep", "ratios")) ? report.sweep.ratios : null;
    const entries = sweep || [report];
    const columns = [["dense", entries[0], "dense"]];
    for (const e of entries) columns.push([sweep ? `ratio ${e.ratio}` : "compressed", e, "compressed"]);
    const table = byId("metrics-table");
    const head = table.tHead;
    const body = table.tBodies[0];
    SVD.clear(head);
    SVD.clear(body);
    head.appendChild(SVD.el("tr", {}, SVD.el("th", {}, "metric"), ...columns.map(([label]) => SVD.el("th", {}, label))));
    for (const [label, pick] of METRIC_ROWS) {
      const values = columns.map(([, entry, side]) => pick(entry, side));
      if (values.every((v) => v === undefined || v === null)) continue;
      body.appendChild(SVD.el("tr", { dataset: { metric: label } }, SVD.el("th", {}, label),
        ...values.map((v) => SVD.el("td", {}, v === undefined || v === null ? "—" : fmt(v)))));
    }
    const ev = entries[0].evaluation || {};  // a sweep evaluates every ratio on the same text
    byId("report-note").textContent = report.metrics || sweep
      ? `Evaluated on ${ev.scored_tokens !== undefined ? fmt(ev.scored_tokens) : "?"} tokens of ${ev.source || "the evaluation text"}.`
      : "This job was not evaluated.";
    byId("report-section").hidden = false;
  }

  async function blobOf(path) {
    const resp = await SVD.api(path, { raw: true });
    return resp.blob();
  }

  function openFigure(name, url) {
    byId("figure-dialog-title").textContent = name;
    byId("figure-dialog-img").src = url;
    byId("figure-dialog-img").alt = name;
    byId("figure-dialog").showModal();
  }

  async function renderFigures(report) {
    const figures = Object.entries(report.figures || {});
    const box = byId("figures");
    SVD.clear(box);
    if (report.figures_error) box.appendChild(SVD.el("p", { class: "muted" }, `Some figures could not be drawn: ${report.figures_error}`));
    if (!figures.length && !report.figures_error) return;
    byId("figures-section").hidden = false;
    for (const [key, fig] of figures) {
      const url = URL.createObjectURL(await blobOf(fig.content_url));
      figureUrls.push(url);
      const img = SVD.el("img", { src: url, alt: key, loading: "lazy" });
      const button = SVD.el("button", { type: "button", class: "figure", dataset: { figure: key } }, img, SVD.el("span", {}, key));
      button.addEventListener("click", () => openFigure(key, url));
      box.appendChild(button);
    }
  }

  function sampleItems(samples, into) {
    if (!samples) return;
    if (samples.skipped) {
      into.appendChild(SVD.el("p", { class: "muted" }, `Skipped: ${samples.reason}`));
      return;
    }
    into.appendChild(SVD.el("p", { class: "muted" }, `Greedy, up to ${samples.max_new_tokens} new tokens per completion.`));
    for (const item of samples.items || []) {
      into.appendChild(SVD.el("div", { class: "sample" },
        SVD.el("p", {}, SVD.el("b", {}, "prompt "), SVD.el("span", { class: "tag" }, item.source), " ", SVD.el("code", {}, item.prompt)),
        SVD.el("div", { class: "pair" },
          SVD.el("div", {}, SVD.el("h3", {}, "dense"), SVD.el("pre", {}, item.dense === undefined ? "—" : item.dense)),
          SVD.el("div", {}, SVD.el("h3", {}, "compressed"), SVD.el("pre", {}, item.compressed === undefined ? "—" : item.compressed)))));
    }
  }

  function renderSamples(report) {
    const box = byId("samples");
    SVD.clear(box);
    const sweep = get(report, "sweep", "ratios");
    if (Array.isArray(sweep)) {
      for (const e of sweep) {
        if (!e.samples) continue;
        const details = SVD.el("details", {}, SVD.el("summary", {}, `ratio ${e.ratio}`));
        sampleItems(e.samples, details);
        box.appendChild(details);
      }
    } else {
      sampleItems(report.samples, box);
    }
    byId("samples-section").hidden = !box.firstChild;
  }

  // --- artifacts ----------------------------------------------------------------------
  async function sha256Hex(blob) {
    if (!(window.crypto && crypto.subtle)) return null;  // not a secure context: nothing to check with
    const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function download(art, note) {
    note.textContent = "downloading…";
    try {
      const blob = await blobOf(art.content_url);
      const url = URL.createObjectURL(blob);
      const a = SVD.el("a", { href: url, download: art.name.split("/").pop() });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      const hex = await sha256Hex(blob);
      note.textContent = hex === null ? "saved" : (hex === art.sha256 ? "saved, sha256 verified" : `saved, sha256 MISMATCH: ${hex}`);
      note.dataset.verified = hex === art.sha256 ? "yes" : "no";
    } catch (err) {
      note.textContent = err.message;
    }
  }

  async function renderArtifacts() {
    const arts = [];
    let after = null;
    for (let i = 0; i < 50; i += 1) {
      const page = await SVD.api(`${JOB_PATH}/artifacts?${new URLSearchParams({ limit: "100", ...(after ? { after } : {}) })}`);
      arts.push(...page.data);
      if (!page.has_more) break;
      after = page.last_id;
    }
    const body = byId("artifacts-body");
    SVD.clear(body);
    arts.sort((a, b) => a.name.localeCompare(b.name));
    for (const art of arts) {
      const note = SVD.el("span", { class: "note" });
      const button = SVD.el("button", { type: "button", class: "download" }, "Download");
      button.addEventListener("click", () => download(art, note));
      body.appendChild(SVD.el("tr", { dataset: { artifact: art.name } }, SVD.el("td", {}, art.name),
        SVD.el("td", { title: `${art.bytes} bytes` }, SVD.bytes(art.bytes)),
        SVD.el("td", {}, SVD.el("code", { class: "sha256" }, art.sha256)), SVD.el("td", {}, button, " ", note)));
    }
    byId("artifacts-section").hidden = arts.length === 0;
  }

  async function finish(job) {
    byId("live-note").textContent = `Finished: ${job.status}.`;
    if (job.status !== "succeeded") return;
    const report = await SVD.api(`${JOB_PATH}/report`);
    renderMetrics(report);
    renderSamples(report);
    await renderArtifacts();
    await renderFigures(report);
  }

  // --- following the job --------------------------------------------------------------
  async function follow() {
    tryStream();
    for (;;) {
      let job;
      try {
        job = await SVD.api(JOB_PATH);
        renderJob(job);
        if (!streaming) await pollEvents();
        SVD.pageProblem(null);
      } catch (err) {
        SVD.pageProblem(err);
        if (err.status === 404 || err.status === 401) return;
        await SVD.sleep(2000);
        continue;
      }
      if (SVD.TERMINAL.has(job.status)) {
        streamAbort.abort();
        await pollEvents();
        await finish(job).catch(SVD.pageProblem);
        return;
      }
      await SVD.sleep(1000);
    }
  }

  SVD.page(() => {
    byId("cancel").addEventListener("click", cancel);
    byId("figure-dialog").addEventListener("click", (e) => {
      if (e.target === byId("figure-dialog")) byId("figure-dialog").close();
    });
    follow();
  });
})();
