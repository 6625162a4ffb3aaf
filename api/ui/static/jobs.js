// The jobs list: newest first, refreshed every second or two while some job is still active.
"use strict";

(() => {
  const PAGE = 20;
  let pages = 1;
  let timer = null;

  function row(job) {
    const link = SVD.el("a", { href: `${SVD.UI}/jobs/${encodeURIComponent(job.id)}` }, job.id);
    const request = job.request || {};
    return SVD.el("tr", { dataset: { jobId: job.id, status: job.status } },
      SVD.el("td", {}, link),
      SVD.el("td", {}, SVD.statusBadge(job.status)),
      SVD.el("td", { class: "model" }, job.model),
      SVD.el("td", {}, SVD.ratioOf(request)),
      SVD.el("td", {}, request.method || ""),
      SVD.el("td", { title: job.created_at }, SVD.age(job.created_at)),
      SVD.el("td", {}, SVD.progressCell(job)));
  }

  async function load() {
    const jobs = [];
    let after = null;
    let more = false;
    for (let i = 0; i < pages; i += 1) {
      const q = new URLSearchParams({ limit: String(PAGE) });
      if (after) q.set("after", after);
      const list = await SVD.api(`${SVD.API}/jobs?${q}`);
      jobs.push(...list.data);
      more = list.has_more;
      after = list.last_id;
      if (!more) break;
    }
    return { jobs, more };
  }

  async function refresh() {
    clearTimeout(timer);
    let active = false;
    try {
      const { jobs, more } = await load();
      const body = document.getElementById("jobs-body");
      SVD.clear(body);
      jobs.forEach((job) => body.appendChild(row(job)));
      document.getElementById("jobs-empty").hidden = jobs.length > 0;
      document.getElementById("jobs-more").hidden = !more;
      active = jobs.some((job) => !SVD.TERMINAL.has(job.status));
      SVD.pageProblem(null);
    } catch (err) {
      SVD.pageProblem(err);
    }
    timer = setTimeout(refresh, active ? 1000 : 5000);
  }

  SVD.page(() => {
    document.getElementById("jobs-more").addEventListener("click", () => {
      pages += 1;
      refresh();
    });
    refresh();
  });
})();
