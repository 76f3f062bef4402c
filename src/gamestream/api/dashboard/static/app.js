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
  const percent1 = new Intl.NumberFormat(undefined, { style: "percent", minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const NO_DATA = "no data yet";  // a figure whose KPI table or column the KPI stage has not written (yet)
  let eventsPlot = null, bookingsPlot = null, activityPlot = null, segmentPlot = null, lastData = null;
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

  // DAU, WAU and MAU per day: each day drawn at its UTC midnight; the axis spans the days shown plus one on each
  // side, and at least a week (widened into the past), so a first day is not a dot lost at the edge of years
  const DAY = 86400;
  const daySeconds = (date) => Date.parse(date + "T00:00:00Z") / 1000;
  let dayRange = null;
  function activityChart(days) {
    const el = $("activity-chart");
    if (!days.length && !activityPlot) return;  // "no data yet" stays
    const xs = days.map((r) => daySeconds(r.eventDate));
    const max = (xs.length ? Math.max(...xs) : Date.now() / 1000) + DAY;
    dayRange = [Math.min((xs.length ? Math.min(...xs) : max) - DAY, max - 8 * DAY), max];
    const data = [xs, days.map((r) => r.dau), days.map((r) => r.wau), days.map((r) => r.mau)];
    if (activityPlot) { activityPlot.setData(data); return; }
    el.replaceChildren();
    const [x, y] = axes();
    const line = (label, color) => ({ label, stroke: css(color), width: 2,
                                      points: { size: 6, fill: css(color), show: (u) => u.data[0].length <= 31 } });
    activityPlot = new uPlot({
      width: width(el), height: 220, tzDate: utc,
      scales: { x: { time: true, range: () => dayRange }, y: { range: fromZero } },
      // ticks on whole days only (uPlot would also split at noon, and each day would be labelled twice)
      axes: [{ ...x, incrs: [DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY], values: (u, splits) => splits.map(day) }, y],
      series: [{ label: "day (UTC)", value: (u, ts) => ts == null ? "–" : new Date(ts * 1e3).toISOString().slice(0, 10) },
               line("DAU", "--dau"), line("WAU", "--wau"), line("MAU", "--mau")],
    }, data, el);
    window.gamestream.plots.activity = activityPlot;
  }

  // the latest day's tiles: a figure the KPI tables do not hold yet reads "no data yet", never a made-up zero
  function activityTiles(a) {
    const duration = (s) => {
      const whole = Math.round(s);
      return whole < 60 ? decimal1.format(s) + " s" : Math.floor(whole / 60) + "m " + String(whole % 60).padStart(2, "0") + "s";
    };
    const tiles = [["wau", a.wau, number], ["mau", a.mau, number], ["stickiness", a.stickiness, percent1],
      ["new-users", a.new_users, number], ["arppu", a.arppu, money], ["conversion", a.conversion, percent1],
      ["sessions", a.sessions, number], ["avg-session", a.avg_session_s, { format: duration }]];
    for (const [id, value, format] of tiles) {
      const el = document.querySelector("[data-testid=" + id + "]");
      el.textContent = value == null ? NO_DATA : format.format(value);
      el.classList.toggle("nodata", value == null);
    }
    $("activity-day").textContent = a.eventDate ? "latest day: " + a.eventDate + " (UTC)" : NO_DATA;
  }

  // one row per install day; each rate cell is shaded with an alpha equal to the rate (0..1), so the eye reads
  // the decay along a row and compares cohorts down a column; a rate still to come is "—", unshaded
  function cohortsTable(cohorts) {
    const tbody = $("cohorts");
    if (!cohorts.length) {
      const tr = document.createElement("tr"), td = document.createElement("td");
      td.colSpan = 5; td.className = "muted"; td.textContent = NO_DATA;
      tr.appendChild(td); tbody.replaceChildren(tr); return;
    }
    tbody.replaceChildren(...cohorts.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.cohort = c.cohort_day;
      const cell = (text, field) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (field) td.dataset.field = field;
        tr.appendChild(td);
        return td;
      };
      cell(c.cohort_day);
      cell(number.format(c.cohort_size), "cohort_size");
      for (const n of [1, 7, 30]) rateCell(cell(c["d" + n] == null ? "—" : percent1.format(c["d" + n]), "d" + n), c, n);
      return tr;
    }));
  }

  function rateCell(td, c, n) {
    const rate = c["d" + n];
    if (rate == null) { td.className = "unmeasured"; td.title = "day " + n + " after install is still to come"; return; }
    td.className = rate > 0.5 ? "rate strong" : "rate";
    td.dataset.rate = rate;
    td.style.setProperty("--rate", String(Math.min(1, Math.max(0, rate))));
    td.title = number.format(c["d" + n + "_users"]) + " of " + number.format(c.cohort_size) + " devices";
  }

  function topEventsList(top) {
    $("top-events-day").textContent = top ? top.eventDate + " (UTC)" : "";
    const rows = top ? top.events : [];
    const most = Math.max(1, ...rows.map((r) => r.events));
    const items = rows.map((r) => {
      const li = document.createElement("li"), name = document.createElement("span"), count = document.createElement("span");
      name.className = "name"; name.textContent = r.eventName;
      count.className = "count"; count.textContent = number.format(r.events);
      li.dataset.event = r.eventName;
      li.style.setProperty("--share", (100 * r.events / most).toFixed(1) + "%");
      li.append(name, count);
      return li;
    });
    if (!items.length) { const li = document.createElement("li"); li.className = "muted"; li.textContent = NO_DATA; items.push(li); }
    $("top-events").replaceChildren(...items);
  }

  // ------------------------------------------------------------------------------------------------ breakdowns
  // The dimension the page is split by ("" = Total), kept in the address (?dimension=country) so that a reload, a
  // bookmark or a shared link shows the same split; every poll asks for it (GET /v1/dashboard?dimension=…).
  const address = new URL(location.href);
  let dimension = address.searchParams.get("dimension") || "";
  let segmentSeries = "";  // the series the segment chart was built with (rebuilt when they change)
  let segmentRange = null;  // its days, as the activity chart's: plus one on each side, at least a week
  window.gamestream.dimension = () => dimension;
  const SERIES_COLORS = ["--s1", "--s2", "--s3", "--s4", "--s5", "--s6", "--s7", "--s8"];
  const OTHER = "(other)";
  const seriesColor = (value, i) => css(value === OTHER ? "--other" : SERIES_COLORS[i % SERIES_COLORS.length]);

  function dashboardUrl() {
    return "/v1/dashboard" + (dimension ? "?dimension=" + encodeURIComponent(dimension) : "");
  }

  function choose(value, note) {
    if (value !== dimension) {  // nothing of the previous split stays on screen while the new one is asked for
      dropSegmentPlot();
      for (const [id, columns] of [["segment-latest", 9], ["segment-cohorts", 6]]) noDataRow($(id), columns, "…");
      $("segment-chart").replaceChildren();
    }
    dimension = value;
    if (value) address.searchParams.set("dimension", value); else address.searchParams.delete("dimension");
    history.replaceState(null, "", address.pathname + address.search + address.hash);
    $("dimension").value = value;
    $("dimension-status").textContent = note || "";
    showSplit(Boolean(value));
  }

  // "Total", then each dimension the segment tables hold (and the chosen one, should they not hold it yet);
  // rebuilt only when that list changes, so an open drop-down is not closed under the viewer's pointer
  function dimensionOptions(dimensions) {
    const select = $("dimension");
    const names = dimensions.slice();
    if (dimension && !names.includes(dimension)) names.push(dimension);
    const wanted = JSON.stringify(names);
    if (select.dataset.options !== wanted) {
      const options = names.map((name) => { const o = document.createElement("option"); o.value = o.textContent = name; return o; });
      const total = document.createElement("option"); total.value = ""; total.textContent = "Total";
      select.replaceChildren(total, ...options);
      select.dataset.options = wanted;
    }
    select.value = dimension;
  }

  function showSplit(split) {
    for (const id of ["segment-latest-card", "segment-chart-card", "cohorts-split"]) $(id).hidden = !split;
    $("cohorts-total").hidden = split;
    document.querySelector(".by-dimension").hidden = !split;
    for (const el of document.querySelectorAll(".dimension-name")) el.textContent = dimension;
    if (!split) dropSegmentPlot();
  }

  function dropSegmentPlot() {
    if (segmentPlot) segmentPlot.destroy();
    segmentPlot = null; segmentSeries = ""; window.gamestream.plots.segments = null;
  }

  function noDataRow(tbody, columns, text) {
    const tr = document.createElement("tr"), td = document.createElement("td");
    td.colSpan = columns; td.className = "muted"; td.textContent = text || NO_DATA;
    tr.appendChild(td); tbody.replaceChildren(tr);
  }

  function swatch(value, series) {
    const i = series.indexOf(value), span = document.createElement("span");
    span.className = "swatch";
    span.style.background = i < 0 ? "transparent" : seriesColor(value, i);
    return span;
  }

  // the latest day's stored rows, every value (a value the chart folds into (other) still has its own row here)
  function segmentLatest(s) {
    $("segment-latest-day").textContent = s.latest ? s.latest.eventDate + " (UTC)" : NO_DATA;
    const tbody = $("segment-latest");
    if (!s.latest || !s.latest.rows.length) { noDataRow(tbody, 9); return; }
    tbody.replaceChildren(...s.latest.rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.value = r.value;
      const name = document.createElement("td");
      name.append(swatch(r.value, s.series), r.value);
      tr.appendChild(name);
      for (const [field, format] of [["dau", number], ["new_users", number], ["events", number], ["bookings", money],
        ["paying_users", number], ["arppu", money], ["conversion", percent1], ["sessions", number]]) {
        const td = document.createElement("td");
        td.dataset.field = field;
        td.textContent = r[field] == null ? "–" : format.format(r[field]);
        tr.appendChild(td);
      }
      return tr;
    }));
  }

  // DAU per day, one line per series; a day without a row for a value is a gap, not a made-up zero
  function segmentChart(s) {
    const el = $("segment-chart");
    const days = [...new Set(s.days.map((r) => r.eventDate))].sort();
    const key = JSON.stringify(s.series);
    if (!days.length) {
      dropSegmentPlot();
      const p = document.createElement("p"); p.className = "muted nodata"; p.textContent = NO_DATA;
      el.replaceChildren(p); return;
    }
    const xs = days.map(daySeconds);
    const dau = new Map(s.days.map((r) => [r.eventDate + "\u0000" + r.value, r.dau]));
    const data = [xs, ...s.series.map((value) => days.map((d) => { const v = dau.get(d + "\u0000" + value); return v == null ? null : v; }))];
    const max = Math.max(...xs) + DAY;
    segmentRange = [Math.min(Math.min(...xs) - DAY, max - 8 * DAY), max];
    if (segmentPlot && key === segmentSeries) { segmentPlot.setData(data); return; }
    if (segmentPlot) segmentPlot.destroy();
    el.replaceChildren();
    const [x, y] = axes();
    segmentPlot = new uPlot({
      width: width(el), height: 240, tzDate: utc,
      scales: { x: { time: true, range: () => segmentRange }, y: { range: fromZero } },
      axes: [{ ...x, incrs: [DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY], values: (u, splits) => splits.map(day) }, y],
      series: [{ label: "day (UTC)", value: (u, ts) => ts == null ? "–" : new Date(ts * 1e3).toISOString().slice(0, 10) },
               ...s.series.map((value, i) => ({ label: value, stroke: seriesColor(value, i), width: 2,
                 dash: value === OTHER ? [5, 4] : undefined,
                 points: { size: 6, fill: seriesColor(value, i), show: (u) => u.data[0].length <= 31 } }))],
    }, data, el);
    segmentSeries = key;
    window.gamestream.plots.segments = segmentPlot;
  }

  // one row per cohort and value, the cohort's first row ruled off; rates shaded as in the totals' table
  function segmentCohorts(s) {
    const tbody = $("segment-cohorts");
    if (!s.retention.length) { noDataRow(tbody, 6); return; }
    let previous = null;
    tbody.replaceChildren(...s.retention.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.cohort = c.cohort_day; tr.dataset.value = c.value;
      if (c.cohort_day !== previous) tr.className = "first-of-cohort";
      const cell = (text, field) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (field) td.dataset.field = field;
        tr.appendChild(td);
        return td;
      };
      cell(c.cohort_day === previous ? "" : c.cohort_day);
      previous = c.cohort_day;
      cell(c.value, "value").className = "value";
      cell(number.format(c.cohort_size), "cohort_size");
      for (const n of [1, 7, 30]) rateCell(cell(c["d" + n] == null ? "—" : percent1.format(c["d" + n]), "d" + n), c, n);
      return tr;
    }));
  }

  function segments(d) {
    const s = d.segments || { dimension: null, dimensions: [] };
    dimensionOptions(s.dimensions);
    // an answer asked for before the viewer changed the selection: its split is not the one on screen
    if ((s.dimension || "") !== dimension || !dimension) return;
    segmentLatest(s);
    segmentChart(s);
    segmentCohorts(s);
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
    activityTiles(d.activity || {});
    activityChart(d.activity_days || []);
    cohortsTable(d.retention || []);
    segments(d);
    topEventsList(d.top_events || null);
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

  // one request and its rendering; `poll` repeats it every second, a change of the selector asks at once
  async function refresh() {
    try {
      const asked = dimension;
      const response = await fetch(dashboardUrl(), { headers, cache: "no-store" });
      if (!response.ok) {
        const answer = await response.json().catch(() => ({}));
        // a dimension the server does not know (an old link, a typo in the address): the totals, and why
        if (response.status === 400 && answer.dimensions && asked && asked === dimension) {
          choose("", "unknown dimension “" + asked + "”: the totals are shown (dimensions: " + answer.dimensions.join(", ") + ")");
          return refresh();
        }
        throw new Error(answer.error || response.statusText);
      }
      lastData = await response.json();
      render(lastData);
      window.gamestream.polls += 1;
      $("pulse").className = "pulse ok";
    } catch (error) {
      $("pulse").className = "pulse err";
      $("updated").textContent = "cannot reach the collector: " + error.message;
    }
  }

  async function poll() {
    try { await refresh(); } finally { setTimeout(poll, 1000); }
  }

  $("dimension").addEventListener("change", (event) => { choose(event.target.value); refresh(); });
  choose(dimension);

  window.addEventListener("resize", () => {
    for (const [plot, id] of [[eventsPlot, "events-chart"], [bookingsPlot, "bookings-chart"], [activityPlot, "activity-chart"],
      [segmentPlot, "segment-chart"]]) {
      if (plot) plot.setSize({ width: width($(id)), height: plot.height });
    }
  });
  poll();
})();
