// gamestream dashboard: polls /v1/dashboard every second and redraws. No framework; uPlot for the charts.
(function () {
  "use strict";
  const key = new URLSearchParams(location.search).get("key");
  const headers = key ? { "X-API-Key": key } : {};
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const $ = (id) => document.getElementById(id);
  const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const money4 = new Intl.NumberFormat(undefined, { minimumFractionDigits: 4, maximumFractionDigits: 4 });
  let eventsPlot = null, bookingsPlot = null, lastData = null;

  function hourLabel(iso) { return iso.slice(5, 16).replace("T", " "); }
  function seconds(iso) { return Date.parse(iso) / 1000; }
  function width(el) { return Math.max(280, el.clientWidth); }
  // windows are UTC (as the KPI tables and the SQL are), whatever the viewer's time zone
  const utc = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");

  // bars and amounts start at zero: an auto-ranged axis would exaggerate small differences
  const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];

  function axes() {
    const stroke = css("--muted"), grid = { stroke: css("--grid") };
    return [{ stroke, grid, ticks: grid }, { stroke, grid, ticks: grid, size: 64 }];
  }

  function eventsChart(rows) {
    const el = $("events-chart");
    const xs = rows.map((r) => seconds(r.window_start));
    const finals = rows.map((r) => (r.final ? r.events : null));
    const provisional = rows.map((r) => (r.final ? null : r.events));
    const data = [xs, finals, provisional];
    if (eventsPlot) { eventsPlot.setData(data); return; }
    const bars = uPlot.paths.bars({ size: [0.8, 60] });
    eventsPlot = new uPlot({
      width: width(el), height: 260, axes: axes(), legend: { show: true }, tzDate: utc,
      scales: { x: { time: true }, y: { range: fromZero } },
      series: [{}, { label: "final", fill: css("--final"), stroke: css("--final"), paths: bars, points: { show: false } },
               { label: "provisional", fill: css("--provisional"), stroke: css("--final"), dash: [4, 3],
                 paths: bars, points: { show: false } }],
    }, data, el);
  }

  function bookingsChart(rows) {
    const el = $("bookings-chart");
    const data = [rows.map((r) => seconds(r.window_start)), rows.map((r) => r.bookings), rows.map((r) => r.purchases)];
    if (bookingsPlot) { bookingsPlot.setData(data); return; }
    const [x, y] = axes();
    bookingsPlot = new uPlot({
      width: width(el), height: 260, scales: { x: { time: true }, y: { range: fromZero }, n: { range: fromZero } }, tzDate: utc,
      axes: [x, y, { ...y, scale: "n", side: 1, size: 48, grid: { show: false } }],
      series: [{}, { label: "bookings", stroke: css("--line"), width: 2, points: { size: 5 } },
               { label: "purchases", stroke: css("--line2"), width: 1.5, scale: "n", dash: [5, 4] }],
    }, data, el);
  }

  function rowsTable(tbody, rows, cells) {
    tbody.replaceChildren(...rows.slice().reverse().map((r) => {
      const tr = document.createElement("tr");
      tr.className = r.final ? "final" : "provisional";
      tr.dataset.window = r.window_start;
      for (const [value, name] of cells(r)) {
        const td = document.createElement("td");
        td.textContent = value;
        if (name) td.dataset.field = name;
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  function render(d) {
    const today = d.today || {};
    $("dau").textContent = number.format(today.dau || 0);
    $("arpdau").textContent = money4.format(today.arpdau || 0);
    $("paying").textContent = number.format(today.paying_users || 0);
    $("bookings-today").textContent = money.format(today.bookings || 0);
    $("eps").textContent = number.format(d.ingest.events_per_second);
    $("backlog").textContent = d.lag.backlog_events == null ? "–" : number.format(d.lag.backlog_events);
    $("freshness").textContent = d.lag.freshness_seconds == null ? "–" : d.lag.freshness_seconds.toFixed(1) + " s";
    $("quarantined").textContent = number.format(d.quarantine.count);
    eventsChart(d.hourly);
    bookingsChart(d.bookings);
    rowsTable($("events-rows"), d.hourly, (r) => [[hourLabel(r.window_start)], [r.events, "events"],
      [r.late_events, "late_events"], [r.final ? "final" : "provisional", "status"]]);
    rowsTable($("bookings-rows"), d.bookings, (r) => [[hourLabel(r.window_start)], [money.format(r.bookings), "bookings"],
      [r.purchases, "purchases"], [r.final ? "final" : "provisional", "status"]]);
    const reasons = d.quarantine.latest.map((q) => {
      const li = document.createElement("li");
      li.textContent = q.reason;
      li.title = q.at;
      return li;
    });
    if (!reasons.length) { const li = document.createElement("li"); li.className = "muted"; li.textContent = "none"; reasons.push(li); }
    $("reasons").replaceChildren(...reasons);
    const t = (d.tables || {}).events || {};
    const health = [["version", t.version], ["files", t.files], ["partitions (days)", t.partitions],
      ["files per partition", t.files_per_partition], ["most files in a partition", t.max_files_in_a_partition],
      ["average file size", t.average_file_bytes == null ? null : (t.average_file_bytes / 1024).toFixed(1) + " KiB"],
      ["small files (< 16 MiB)", t.small_files], ["last OPTIMIZE", t.last_optimize || "never"],
      ["last VACUUM", t.last_vacuum || "never"]];
    $("health").replaceChildren(...health.flatMap(([k, v]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = v == null ? "–" : String(v);
      return [dt, dd];
    }));
    $("updated").textContent = "updated " + new Date(d.generated_at).toLocaleTimeString();
    document.body.dataset.generatedAt = d.generated_at;
  }

  async function poll() {
    try {
      const response = await fetch("/v1/dashboard", { headers, cache: "no-store" });
      if (!response.ok) throw new Error((await response.json()).error || response.statusText);
      lastData = await response.json();
      render(lastData);
      $("pulse").className = "pulse ok";
    } catch (error) {
      $("pulse").className = "pulse err";
      $("updated").textContent = "cannot reach the collector: " + error.message;
    } finally {
      setTimeout(poll, 1000);
    }
  }

  window.addEventListener("resize", () => {
    for (const [plot, id] of [[eventsPlot, "events-chart"], [bookingsPlot, "bookings-chart"]]) {
      if (plot) plot.setSize({ width: width($(id)), height: 260 });
    }
  });
  poll();
})();
