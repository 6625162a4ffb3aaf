// The submit form: the common fields of POST /v1/jobs. Empty fields are left out (the
// server's defaults apply); the API validates everything and its problem is shown as is.
"use strict";

(() => {
  const form = () => document.getElementById("job-form");
  let idempotencyKey = SVD.randomId();  // a double submit of the same form makes one job

  // Rows marked data-when="<select id>=<value>" show only for that choice.
  function syncConditional() {
    for (const rowEl of form().querySelectorAll("[data-when]")) {
      const [id, value] = rowEl.dataset.when.split("=");
      rowEl.hidden = document.getElementById(id).value !== value;
    }
  }

  async function loadFiles() {
    const files = [];
    let after = null;
    for (let i = 0; i < 10; i += 1) {
      const q = new URLSearchParams({ limit: "100" });
      if (after) q.set("after", after);
      const list = await SVD.api(`${SVD.API}/files?${q}`);
      files.push(...list.data);
      if (!list.has_more) break;
      after = list.last_id;
    }
    for (const select of form().querySelectorAll("select[data-files]")) {
      SVD.clear(select);
      if (!files.length) select.appendChild(SVD.el("option", { value: "" }, "(no uploaded files)"));
      for (const f of files) {
        select.appendChild(SVD.el("option", { value: f.id }, `${f.filename} (${f.purpose}, ${SVD.bytes(f.bytes)})`));
      }
    }
  }

  function setPath(obj, path, value) {
    const parts = path.split(".");
    let o = obj;
    for (const p of parts.slice(0, -1)) {
      o[p] = o[p] || {};
      o = o[p];
    }
    o[parts[parts.length - 1]] = value;
  }

  // A field's JSON value, or undefined to leave it out. Numbers that do not parse are sent
  // as the text typed, so the API's validation names the field.
  function valueOf(input) {
    if (input.dataset.bool !== undefined) return input.checked;
    const text = input.value.trim();
    if (text === "") return undefined;
    if (input.dataset.int !== undefined) return /^-?\d+$/.test(text) ? Number(text) : text;
    return text;
  }

  function ratioFields(body, text) {
    if (text === "") return;
    const parts = text.split(",").map((p) => p.trim()).filter((p) => p !== "");
    const nums = parts.map((p) => (/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(p) ? Number(p) : p));
    if (nums.length > 1) body.ratios = nums;
    else body.ratio = nums[0];
  }

  function requestBody() {
    const body = {};
    for (const input of form().querySelectorAll("input[name], select[name]")) {
      if (input.name === "ratio" || input.closest("[hidden]")) continue;
      const v = valueOf(input);
      if (v !== undefined) setPath(body, input.name, v);
    }
    ratioFields(body, document.getElementById("ratio").value.trim());
    return body;
  }

  async function submit(event) {
    event.preventDefault();
    const button = document.getElementById("submit");
    button.disabled = true;
    try {
      const job = await SVD.api(`${SVD.API}/jobs`, {
        method: "POST", json: requestBody(), headers: { "Idempotency-Key": idempotencyKey },
      });
      window.location.assign(`${SVD.UI}/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      if (err.doc && err.doc.code === "idempotency_key_reused") idempotencyKey = SVD.randomId();
      SVD.pageProblem(err);
      button.disabled = false;
    }
  }

  SVD.page(() => {
    form().addEventListener("submit", submit);
    form().addEventListener("change", syncConditional);
    // a changed form is another request: a new key, so a corrected retry is not refused
    form().addEventListener("input", () => { idempotencyKey = SVD.randomId(); });
    syncConditional();
    loadFiles().catch(SVD.pageProblem);
  });
})();
