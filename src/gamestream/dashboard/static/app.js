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
  const decimal1 = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const upTo1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  let eventsPlot = null, bookingsPlot = null, lastData = null;
  // the plots and the poll count, for the end-to-end test (tests/test_dashboard.py) and for curious consoles
  window.gamestream = { plots: {}, polls: 0 };

  const HOUR = 3600;
  function hourLabel(iso) { return iso.slice(5, 16).replace("T", " "); }
  function seconds(iso) { return Date.parse(iso) / 1000; }
  function width(el) { return Math.max(280, el.clientWidth); }
  // windows are UTC (as the KPI tables and the SQL are), whatever the viewer's time zone
  const utc = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  // a window is drawn at its middle, so that its bar sits within its own hour rather than straddling two
  const middle = (r) => seconds(r.window_start) + HOUR / 2;
  const clock = (ts) => new Date(ts * 1e3).toISOString().slice(11, 16);
  const day = (ts) => new Date(ts * 1e3).toISOString().slice(5, 10);
  // the legend names the window (UTC), not the middle it is drawn at
  const windowLabel = (u, x) => x == null ? "–"
    : day(x - HOUR / 2) + " " + clock(x - HOUR / 2) + "–" + clock(x + HOUR / 2);

  // bars and amounts start at zero: an auto-ranged axis would exaggerate small differences
  const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];

  // The time axis spans the windows shown (from the first one's start to the last one's end), padded by an hour,
  // and at least MIN_SPAN wide, widened into the past so the newest window sits near the right edge, as on a
  // timeline. uPlot's own range for a single x value is years wide (the demo's first hour: one bar squeezed
  // against the edge of Jan 2027 – Jul 2029); a range from the data alone also never spans years of emptiness
  // between old loaded data and now.
  const MIN_SPAN = 6 * HOUR;
  let xRange = null;
  function timeRange(rows) {
    if (!rows.length) { const now = Date.now() / 1000; return [now - MIN_SPAN + HOUR, now + HOUR]; }
    const starts = rows.map((r) => seconds(r.window_start));
    const max = Math.max(...starts) + 2 * HOUR;
    return [Math.min(Math.min(...starts) - HOUR, max - MIN_SPAN), max];
  }
  const sharedX = () => xRange;
  // points on the line only when they are few (a single window is otherwise an invisible zero-length line)
  const fewPoints = (u) => u.data[0].length <= 24;

  const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function bytes(n) {
    let unit = 0;
    while (n >= 1024 && unit < BYTE_UNITS.length - 1) { n /= 1024; unit += 1; }
    return upTo1.format(n) + " " + BYTE_UNITS[unit];
  }

  // "2 min ago", from the server's clock (generated_at), so a viewer's skewed clock does not matter
  function ago(iso, now) {
    if (!iso) return "never";
    const s = Math.max(0, (Date.parse(now) - Date.parse(iso)) / 1000);
    if (s < 60) return Math.floor(s) + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 48 * 3600) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  // time ticks in the windows' own notation (17:00, UTC), with the date under the first tick and under midnights
  const timeTicks = (u, splits) => splits.map((ts, i) => (i === 0 || clock(ts) === "00:00" ? clock(ts) + "\n" + day(ts)
                                                                                         : clock(ts)));

  function axes() {
    const stroke = css("--muted"), grid = { stroke: css("--grid") };
    return [{ stroke, grid, ticks: grid, values: timeTicks }, { stroke, grid, ticks: grid, size: 64 }];
  }

  function eventsChart(rows) {
    const el = $("events-chart");
    const xs = rows.map(middle);
    const finals = rows.map((r) => (r.final ? r.events : null));
    const provisional = rows.map((r) => (r.final ? null : r.events));
    const data = [xs, finals, provisional];
    if (eventsPlot) { eventsPlot.setData(data); return; }
    const bars = uPlot.paths.bars({ size: [0.8, 60] });
    eventsPlot = new uPlot({
      width: width(el), height: 260, axes: axes(), legend: { show: true }, tzDate: utc,
      scales: { x: { time: true, range: sharedX }, y: { range: fromZero } },
      series: [{ label: "window (UTC)", value: windowLabel },
               { label: "final", fill: css("--final"), stroke: css("--final"), paths: bars, points: { show: false } },
               { label: "provisional", fill: css("--provisional"), stroke: css("--final"), dash: [4, 3],
                 paths: bars, points: { show: false } }],
    }, data, el);
    window.gamestream.plots.events = eventsPlot;
  }

  function bookingsChart(rows) {
    const el = $("bookings-chart");
    const data = [rows.map(middle), rows.map((r) => r.bookings), rows.map((r) => r.purchases)];
    if (bookingsPlot) { bookingsPlot.setData(data); return; }
    const [x, y] = axes();
    bookingsPlot = new uPlot({
      width: width(el), height: 260, tzDate: utc,
      scales: { x: { time: true, range: sharedX }, y: { range: fromZero }, n: { range: fromZero } },
      axes: [x, y, { ...y, scale: "n", side: 1, size: 48, grid: { show: false } }],
      series: [{ label: "window (UTC)", value: windowLabel },
               { label: "bookings", stroke: css("--line"), width: 2, points: { size: 8, fill: css("--line"), show: fewPoints } },
               { label: "purchases", stroke: css("--line2"), width: 1.5, scale: "n", dash: [5, 4],
                 points: { size: 6, fill: css("--line2"), show: fewPoints } }],
    }, data, el);
    window.gamestream.plots.bookings = bookingsPlot;
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
    const freshness = d.lag.freshness_seconds;
    $("freshness").textContent = freshness == null ? "–" : decimal1.format(freshness) + " s";
    $("quarantined").textContent = number.format(d.quarantine.count);
    xRange = timeRange(d.hourly.concat(d.bookings));
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
      ["average file size", t.average_file_bytes == null ? null : bytes(t.average_file_bytes)],
      [t.small_file_bytes == null ? "small files" : "small files (< " + bytes(t.small_file_bytes) + ")", t.small_files],
      ["last OPTIMIZE", t.version == null ? null : ago(t.last_optimize, d.generated_at), t.last_optimize],
      ["last VACUUM", t.version == null ? null : ago(t.last_vacuum, d.generated_at), t.last_vacuum]];
    $("health").replaceChildren(...health.flatMap(([k, v, title]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = v == null ? "–" : String(v);
      if (title) dd.title = title;  // the exact time (ISO, UTC) on hover
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
      window.gamestream.polls += 1;
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
