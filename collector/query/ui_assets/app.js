// The latency page: reads the collector's POST /query, GET /reports and Jaeger GET /api/traces/{id},
// nothing else. Paths are relative to /ui/, so the page also works behind a proxy prefix.
"use strict";

(function () {
  const C = window.ttCharts;
  const TOKEN_KEY = "tokentrace.token";
  const BINS_PER_DECADE = 5;
  const SLOWEST = 20;
  // Window length (s) → bucket length (s): about a hundred buckets at most.
  const BUCKETS_S = { 60: 1, 300: 5, 900: 10, 3600: 60, 21600: 300, 86400: 900 };
  const TTFT_BY = ["prefill_node", "decode_node", "router_node"];

  // The window clause every overview query shares; from/to are fixed when the page
  // loads data, so every chart (and a test reading it) covers exactly the same rows.
  const WINDOW = "ts >= fromUnixTimestamp64Milli({from_ms:Int64}) " +
    "AND ts < fromUnixTimestamp64Milli({to_ms:Int64})";
  const BUCKET = "intDiv(toUnixTimestamp64Milli(ts), {bucket_ms:Int64}) * {bucket_ms:Int64}";
  const SQL = {
    ttft: (by) => `SELECT ${BUCKET} AS t_ms, ${by} AS node,
        quantilesExactInclusive(0.5, 0.9, 0.99)(ttft_s) AS q, count() AS requests
      FROM tokentrace.requests
      WHERE ${WINDOW} AND ttft_s IS NOT NULL AND ${by} IS NOT NULL
      GROUP BY t_ms, node ORDER BY node, t_ms`,
    itl: `SELECT ${BUCKET} AS t_ms, node,
        quantilesExactInclusive(0.5, 0.9, 0.99)(itl_s) AS q, count() AS gaps
      FROM tokentrace.token_latencies
      WHERE ${WINDOW} AND itl_s IS NOT NULL
      GROUP BY t_ms, node ORDER BY node, t_ms`,
    heatmap: `SELECT node, ${BUCKET} AS t_ms,
        toInt32(floor(log10(itl_s) * ${BINS_PER_DECADE})) AS bin, count() AS n
      FROM tokentrace.token_latencies
      WHERE ${WINDOW} AND itl_s > 0
      GROUP BY node, t_ms, bin ORDER BY node, t_ms, bin`,
    kv: `SELECT src_node, dst_node, count() AS transfers, sum(bytes) AS total_bytes,
        sum(duration_s) AS total_s, sum(bytes) / sum(duration_s) AS bytes_per_s,
        quantileExactInclusive(0.5)(bytes / duration_s) AS p50_bytes_per_s
      FROM tokentrace.kv_transfers
      WHERE ${WINDOW} AND duration_s > 0
      GROUP BY src_node, dst_node ORDER BY src_node, dst_node`,
    // Token gaps whose engine step also prefilled a prompt (a worker doing both:
    // piggy-backed prefill) against the rest; rows whose emitter does not say are left out.
    prefill: `SELECT node, count() AS gaps,
        countIf(step_prefill_tokens > 0) AS with_prefill,
        if(with_prefill > 0, quantileExactInclusiveIf(0.5)(itl_s, step_prefill_tokens > 0), NULL)
          AS p50_with,
        if(with_prefill > 0, quantileExactInclusiveIf(0.99)(itl_s, step_prefill_tokens > 0), NULL)
          AS p99_with,
        if(with_prefill < gaps, quantileExactInclusiveIf(0.5)(itl_s, step_prefill_tokens = 0), NULL)
          AS p50_without,
        if(with_prefill < gaps, quantileExactInclusiveIf(0.99)(itl_s, step_prefill_tokens = 0), NULL)
          AS p99_without
      FROM tokentrace.token_latencies
      WHERE ${WINDOW} AND itl_s IS NOT NULL AND step_prefill_tokens IS NOT NULL
      GROUP BY node ORDER BY node`,
    slowest: `SELECT trace_id, request_id, toUnixTimestamp64Milli(ts) AS ts_ms, router_node,
        prefill_node, decode_node, ttft_s, e2e_s, output_tokens, status
      FROM tokentrace.requests
      WHERE ${WINDOW} AND e2e_s IS NOT NULL
      ORDER BY e2e_s DESC, trace_id LIMIT ${SLOWEST}`,
  };

  const $ = (id) => document.getElementById(id);
  let pending = null;  // resolves when the user gives a token

  function setStatus(message, isError) {
    const s = $("status");
    s.textContent = message;
    s.className = isError ? "error" : "";
  }

  function askForToken() {
    const form = $("token-form");
    form.hidden = false;
    $("token").focus();
    if (!pending) {
      pending = new Promise((resolve) => {
        form.onsubmit = (event) => {
          event.preventDefault();
          localStorage.setItem(TOKEN_KEY, $("token").value);
          form.hidden = true;
          pending = null;
          resolve();
        };
      });
    }
    return pending;
  }

  // fetch with the stored bearer token; on 401 ask for one and try again.
  async function api(path, init) {
    for (;;) {
      const headers = Object.assign({}, (init && init.headers) || {});
      const token = localStorage.getItem(TOKEN_KEY);
      if (token) headers.authorization = `Bearer ${token}`;
      const response = await fetch(path, Object.assign({}, init, { headers }));
      if (response.status === 401) {
        setStatus(token ? "the stored token was refused" : "a bearer token is required", true);
        await askForToken();
        continue;
      }
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        const why = body.error || (body.errors && body.errors[0] && body.errors[0].msg);
        throw new Error(`${path}: ${response.status} ${why || response.statusText}`);
      }
      return body;
    }
  }

  async function query(sql, params) {
    const body = await api("../query", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ sql, params }),
    });
    return body.rows.map((row) => Object.fromEntries(body.columns.map((c, i) => [c, row[i]])));
  }

  function window_() {
    const rangeS = Number($("range").value);
    const toMs = Math.floor(Date.now() / 1000) * 1000 + 1000;
    const bucketMs = (BUCKETS_S[rangeS] || Math.ceil(rangeS / 90)) * 1000;
    // Whole buckets, so the first and last are not cut short.
    const fromMs = Math.floor((toMs - rangeS * 1000) / bucketMs) * bucketMs;
    return { from_ms: fromMs, to_ms: Math.ceil(toMs / bucketMs) * bucketMs, bucket_ms: bucketMs };
  }

  function bySeries(rows, qi) {
    const series = new Map();
    for (const r of rows) {
      if (!series.has(r.node)) series.set(r.node, []);
      const value = r.q[qi];
      if (value === null || value === undefined) continue;
      series.get(r.node).push({ t_ms: r.t_ms, value: Number(value) });
    }
    return [...series].map(([name, points]) => ({ name, points }));
  }

  async function loadOverview() {
    const w = window_();
    const qi = Number($("quantile").value);
    const qName = $("quantile").selectedOptions[0].textContent;
    const by = TTFT_BY.includes($("ttft-by").value) ? $("ttft-by").value : TTFT_BY[0];
    setStatus("loading…");
    const [ttft, itl, cells, kv, prefill, slow] = await Promise.all([
      query(SQL.ttft(by), w), query(SQL.itl, w), query(SQL.heatmap, w), query(SQL.kv, w),
      query(SQL.prefill, w), query(SQL.slowest, w),
    ]);
    const common = { fromMs: w.from_ms, toMs: w.to_ms, bucketMs: w.bucket_ms };
    C.lineChart($("ttft-chart"), Object.assign({
      series: bySeries(ttft, qi), label: `TTFT ${qName} by ${by}`,
    }, common));
    $("ttft-chart").dataset.quantile = qName;
    $("ttft-chart").dataset.by = by;
    C.lineChart($("itl-chart"), Object.assign({
      series: bySeries(itl, qi), label: `ITL ${qName} by decode node`,
    }, common));
    $("itl-chart").dataset.quantile = qName;
    C.heatmap($("heatmap-chart"), Object.assign({
      cells: cells.map((c) => ({ node: c.node, t_ms: c.t_ms, bin: c.bin, n: c.n })),
      binsPerDecade: BINS_PER_DECADE,
    }, common));
    C.barChart($("kv-chart"), kv.map((r) => ({
      label: `${r.src_node} → ${r.dst_node}`,
      value: r.bytes_per_s,
      text: `${C.fmtBytesPerS(r.bytes_per_s)} · median ${C.fmtBytesPerS(r.p50_bytes_per_s)}` +
        ` · ${r.transfers} transfers`,
      attrs: {
        "data-src": r.src_node, "data-dst": r.dst_node, "data-transfers": r.transfers,
        "data-bytes": r.total_bytes, "data-p50": r.p50_bytes_per_s,
      },
    })), "KV transfer bandwidth");
    renderPrefillSteps(prefill);
    renderSlowest(slow);
    await loadReports(w);
    setStatus(`${C.fmtClock(w.from_ms)} – ${C.fmtClock(w.to_ms)}, ${w.bucket_ms / 1000} s buckets`);
  }

  function cell(tr, content, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (content instanceof Node) td.appendChild(content); else td.textContent = content;
    tr.appendChild(td);
  }

  function renderPrefillSteps(rows) {
    const box = $("prefill-table");
    box.replaceChildren();
    if (!rows.length) {
      box.textContent = "no token gaps in this window";
      return;
    }
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>decode node</th><th class=num>gaps</th>" +
      "<th class=num>on steps with prefill</th><th class=num>ITL p50 / p99 with</th>" +
      "<th class=num>ITL p50 / p99 without</th></tr></thead>";
    const tbody = document.createElement("tbody");
    const pair = (a, b) => (a === null ? "—" : `${C.fmtMs(a)} / ${C.fmtMs(b)}`);
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = "prefill-steps";
      Object.assign(tr.dataset, {
        node: r.node, gaps: r.gaps, withPrefill: r.with_prefill,
        p99With: r.p99_with === null ? "" : r.p99_with,
        p99Without: r.p99_without === null ? "" : r.p99_without,
      });
      const share = r.gaps ? (100 * r.with_prefill) / r.gaps : 0;
      cell(tr, r.node);
      cell(tr, String(r.gaps), "num");
      cell(tr, `${r.with_prefill} (${share.toFixed(1)}%)`, "num");
      cell(tr, pair(r.p50_with, r.p99_with), "num");
      cell(tr, pair(r.p50_without, r.p99_without), "num");
      tbody.appendChild(tr);
    }
    table.appendChild(tbody);
    box.appendChild(table);
  }

  // The named reports (GET /reports): the tables tokentrace report and the demo print,
  // from the same SQL on the server; numbers formatted as they format them.
  const UNITS = {
    ms: (v) => (v * 1000).toFixed(2),
    signed_ms: (v) => `${v >= 0 ? "+" : ""}${(v * 1000).toFixed(2)}`,
    kib: (v) => (v / 1024).toFixed(0),
    mb_s: (v) => (v / 1e6).toFixed(1),
    float: (v) => Number(v).toFixed(2),
  };
  let reportList = null;

  async function loadReports(w) {
    if (!reportList) reportList = (await api("../reports")).reports;
    const box = $("reports");
    box.dataset.fromMs = w.from_ms;
    box.dataset.toMs = w.to_ms;
    const params = `from_ms=${w.from_ms}&to_ms=${w.to_ms}`;
    const results = await Promise.all(reportList.map((r) => api(
      `../reports/${encodeURIComponent(r.name)}?${params}`)));
    box.replaceChildren();
    reportList.forEach((report, k) => {
      const body = results[k];
      const h = document.createElement("h3");
      h.textContent = report.title;
      const table = document.createElement("table");
      table.dataset.report = report.name;
      const head = document.createElement("tr");
      for (const c of report.columns) {
        const th = document.createElement("th");
        th.textContent = c.header;
        if (c.unit !== "text") th.className = "num";
        head.appendChild(th);
      }
      const thead = document.createElement("thead");
      thead.appendChild(head);
      table.appendChild(thead);
      const tbody = document.createElement("tbody");
      for (const values of body.rows) {
        const row = Object.fromEntries(body.columns.map((c, i) => [c, values[i]]));
        const tr = document.createElement("tr");
        tr.className = "report-row";
        for (const c of report.columns) {
          const v = row[c.key];
          tr.setAttribute(`data-${c.key}`, v === null ? "" : String(v));
          const text = v === null || Number.isNaN(v) ? "—"
            : (UNITS[c.unit] ? UNITS[c.unit](v) : String(v));
          cell(tr, text, c.unit === "text" ? "" : "num");
        }
        tbody.appendChild(tr);
      }
      if (!body.rows.length) {
        const tr = document.createElement("tr");
        cell(tr, "no rows in this window");
        tbody.appendChild(tr);
      }
      table.appendChild(tbody);
      box.append(h, table);
    });
  }

  function renderSlowest(rows) {
    const box = $("slowest-table");
    box.replaceChildren();
    if (!rows.length) {
      box.textContent = "no requests in this window";
      return;
    }
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>when</th><th>trace</th><th>router → prefill → decode</th>" +
      "<th class=num>TTFT</th><th class=num>E2E</th><th class=num>tokens</th><th>status</th>" +
      "</tr></thead>";
    const tbody = document.createElement("tbody");
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = "slow-request";
      tr.dataset.traceId = r.trace_id;
      tr.dataset.e2eS = r.e2e_s;
      const a = document.createElement("a");
      a.href = `#trace=${r.trace_id}`;
      a.className = "trace-link";
      a.appendChild(document.createElement("code")).textContent = r.trace_id;
      cell(tr, C.fmtClock(r.ts_ms));
      cell(tr, a);
      cell(tr, [r.router_node, r.prefill_node, r.decode_node].map((n) => n || "—").join(" → "));
      cell(tr, r.ttft_s === null ? "—" : C.fmtMs(r.ttft_s), "num");
      cell(tr, C.fmtMs(r.e2e_s), "num");
      cell(tr, r.output_tokens === null ? "—" : String(r.output_tokens), "num");
      cell(tr, r.status || "—");
      tbody.appendChild(tr);
    }
    table.appendChild(tbody);
    box.appendChild(table);
  }

  // Router first, then prefill, then decode: the order a request travels.
  const ROLE_ORDER = { router: 0, prefill: 1, decode: 2 };
  const SPAN_ORDER = { "llm.request": 0, "llm.prefill": 1, "llm.kv_transfer": 2,
    "llm.decode": 3 };

  function tagMap(tags) {
    return Object.fromEntries((tags || []).map((t) => [t.key, t.value]));
  }

  async function loadTrace(traceId) {
    $("waterfall-title").textContent = `trace ${traceId}`;
    setStatus("loading…");
    const body = await api(`../api/traces/${encodeURIComponent(traceId)}`);
    const trace = body.data[0];
    const nodes = new Map();
    for (const span of trace.spans) {
      const process = trace.processes[span.processID] || { tags: [] };
      const ptags = tagMap(process.tags);
      const node = ptags["tokentrace.node.id"] || process.serviceName || "?";
      if (!nodes.has(node)) {
        nodes.set(node, { node, role: ptags["tokentrace.role"], first: span.startTime, spans: [] });
      }
      const lane = nodes.get(node);
      lane.first = Math.min(lane.first, span.startTime);
      lane.spans.push(span);
    }
    const lanes = [...nodes.values()].sort((a, b) =>
      ((ROLE_ORDER[a.role] ?? 3) - (ROLE_ORDER[b.role] ?? 3)) || (a.first - b.first));
    const drawn = lanes.map((lane) => {
      const spans = lane.spans.slice().sort((a, b) =>
        ((SPAN_ORDER[a.operationName] ?? 4) - (SPAN_ORDER[b.operationName] ?? 4)) ||
        (a.startTime - b.startTime));
      const tokens = spans.filter((s) => s.operationName === "llm.token");
      const rows = spans.filter((s) => s.operationName !== "llm.token")
        .map((s) => ({ label: s.operationName, spans: [mark(s, lane.node)] }));
      if (tokens.length) {
        rows.push({ label: `llm.token ×${tokens.length}`, spans: tokens.map((s) => mark(s, lane.node)) });
      }
      return { node: lane.node, rows };
    });
    C.waterfall($("waterfall-chart"), drawn, traceId);
    setStatus(`${trace.spans.length} spans on ${lanes.length} nodes`);
  }

  function mark(span, node) {
    const tags = tagMap(span.tags);
    const moved = tags["tokentrace.clock.adjustment_us"];
    const error = tags.error === true || tags["otel.status_code"] === "ERROR";
    let tip = `${span.operationName} on ${node}, ${C.fmtMs(span.duration / 1e6)}`;
    if (tags["tokentrace.token.index"] !== undefined) tip += `, token ${tags["tokentrace.token.index"]}`;
    if (moved !== undefined) tip += `, clock moved ${(Number(moved) / 1000).toFixed(3)} ms`;
    return {
      name: span.operationName, start_us: span.startTime, duration_us: span.duration, error, tip,
      attrs: {
        "data-span-id": span.spanID, "data-start-us": span.startTime,
        "data-duration-us": span.duration, "data-clock-adjustment-us": moved,
      },
    };
  }

  function route() {
    const match = /^#trace=([0-9a-fA-F]{1,32})$/.exec(location.hash);
    $("overview").hidden = Boolean(match);
    $("trace").hidden = !match;
    const body = document.body.dataset;
    body.ready = "false";
    const work = match ? loadTrace(match[1].toLowerCase()) : loadOverview();
    // ready: how the last load ended; loads: how many ended (one can wait for the next).
    const ended = (how) => {
      body.ready = how;
      body.loads = String(Number(body.loads || 0) + 1);
    };
    work.then(() => ended("true"), (err) => {
      setStatus(String(err.message || err), true);
      ended("error");
    });
  }

  window.addEventListener("hashchange", route);
  for (const id of ["range", "quantile", "ttft-by"]) $(id).addEventListener("change", route);
  $("refresh").addEventListener("click", route);
  route();
})();
