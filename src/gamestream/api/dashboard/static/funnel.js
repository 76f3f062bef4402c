// gamestream dashboard, the funnel panel: the steps typed one a line are sent to POST /v1/funnel (the admin key of
// the page's ?key=, as a header); the answer's total row is drawn as bars, each step's devices against step 1's,
// and its days as a table. The definition is the server's (docs/kpi.md, "Funnels"); nothing is counted here.
(function () {
  "use strict";
  const key = new URLSearchParams(location.search).get("key");
  const $ = (id) => document.getElementById(id);
  const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const percent = new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 1 });
  window.gamestream = window.gamestream || {};

  function element(tag, attributes, text) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) el.setAttribute(name, value);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function request() {
    const steps = $("funnel-steps").value.split("\n").map((s) => s.trim()).filter((s) => s.length);
    const body = { steps };
    for (const [field, id] of [["within", "funnel-within"], ["from", "funnel-from"], ["to", "funnel-to"]]) {
      const value = $(id).value.trim();
      if (value) body[field] = value;
    }
    return body;
  }

  // one bar per step: the total's devices at that step, its width their share of step 1's
  function bars(answer) {
    const holder = $("funnel-bars");
    holder.replaceChildren();
    const total = answer.rows.find((row) => row.day === "total");
    if (!total) { holder.append(element("p", { class: "muted" }, "no device did step 1 on these days")); return; }
    answer.steps.forEach((step, index) => {
      const k = index + 1, count = total["step_" + k], share = total.step_1 ? count / total.step_1 : 0;
      const row = element("div", { class: "funnel-row", "data-testid": "funnel-step", "data-step": String(k) });
      row.append(element("span", { class: "funnel-label" }, k + ". " + step));
      const track = element("span", { class: "funnel-track" });
      const bar = element("span", { class: "funnel-bar" });
      bar.style.width = (100 * share).toFixed(2) + "%";
      track.append(bar);
      row.append(track);
      row.append(element("span", { class: "funnel-count", "data-field": "count" }, number.format(count)));
      row.append(element("span", { class: "funnel-share muted" }, k === 1 ? "" : percent.format(share)));
      holder.append(row);
    });
    const days = answer.rows.filter((row) => row.day !== "total");
    const table = element("table", { class: "windows", "data-testid": "funnel-days" });
    const head = element("tr");
    ["day", ...answer.steps.map((_, i) => "step " + (i + 1)), "conversion"].forEach((h) => head.append(element("th", {}, h)));
    const thead = element("thead");
    thead.append(head);
    table.append(thead);
    const tbody = element("tbody");
    for (const row of days) {
      const tr = element("tr", { "data-day": row.day });
      tr.append(element("td", {}, row.day));
      answer.steps.forEach((_, i) => tr.append(element("td", {}, number.format(row["step_" + (i + 1)]))));
      tr.append(element("td", {}, row.conversion == null ? "–" : percent.format(row.conversion)));
      tbody.append(tr);
    }
    table.append(tbody);
    const details = element("details");
    details.append(element("summary", {}, "Days"), table);
    holder.append(details);
  }

  async function run(event) {
    event.preventDefault();
    const status = $("funnel-status");
    status.className = "muted";
    status.textContent = "counting…";
    try {
      const response = await fetch("/v1/funnel", {
        method: "POST", body: JSON.stringify(request()),
        headers: { "Content-Type": "application/json", ...(key ? { "X-API-Key": key } : {}) },
      });
      const answer = await response.json();
      if (!response.ok) {
        $("funnel-bars").replaceChildren();
        status.className = "error";
        status.textContent = answer.error || ("HTTP " + response.status);
        return;
      }
      status.textContent = "within " + answer.within + ", step 1 from " + answer.from + " to " + answer.to
        + " (UTC); totals are device-days";
      bars(answer);
      window.gamestream.funnel = answer;
    } catch (error) {
      status.className = "error";
      status.textContent = String(error);
    }
  }

  $("funnel-form").addEventListener("submit", run);
})();
