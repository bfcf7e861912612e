// Hand-made SVG charts for the latency page. Every mark carries the numbers it draws
// as data-* attributes (the raw values from the API, unrounded), so what a chart shows
// can be read back and compared with the SQL that produced it.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2e6fdb", "#e0631a", "#1f9d55", "#9b3fd1", "#c9a000", "#d13f6b",
    "#0e9aa7", "#6b7280"];

  function el(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, x, y, content, attrs) {
    const t = el("text", Object.assign({ x, y }, attrs || {}), parent);
    t.textContent = content;
    return t;
  }

  function title(parent, content) {
    el("title", {}, parent).textContent = content;
  }

  function svg(container, width, height, attrs) {
    container.replaceChildren();
    return el("svg", Object.assign({
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    }, attrs || {}), container);
  }

  function empty(container, message) {
    const s = svg(container, 900, 60, { "data-empty": "true" });
    text(s, 12, 34, message, { class: "empty" });
  }

  function fmtMs(seconds) {
    const ms = seconds * 1000;
    if (ms >= 100) return `${ms.toFixed(0)} ms`;
    if (ms >= 10) return `${ms.toFixed(1)} ms`;
    return `${ms.toFixed(2)} ms`;
  }

  function fmtClock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function fmtBytesPerS(v) {
    const units = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
  }

  // A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function timeAxis(s, x0, x1, y, fromMs, toMs) {
    const g = el("g", { class: "axis" }, s);
    el("line", { x1: x0, x2: x1, y1: y, y2: y }, g);
    const ticks = 6;
    for (let i = 0; i <= ticks; i += 1) {
      const ms = fromMs + (toMs - fromMs) * i / ticks;
      const x = x0 + (x1 - x0) * i / ticks;
      el("line", { x1: x, x2: x, y1: y, y2: y + 4 }, g);
      text(g, x, y + 16, fmtClock(ms), { "text-anchor": "middle" });
    }
  }

  function legend(container, names) {
    const div = document.createElement("div");
    div.className = "legend";
    names.forEach((name, i) => {
      const span = document.createElement("span");
      span.textContent = name;
      span.style.setProperty("--swatch", PALETTE[i % PALETTE.length]);
      div.appendChild(span);
    });
    container.prepend(div);
  }

  // series: [{name, points: [{t_ms, value, attrs}]}]; values in seconds, drawn in ms.
  function lineChart(container, opts) {
    const { series, fromMs, toMs, bucketMs, label } = opts;
    if (!series.length) {
      empty(container, "no rows in this window");
      return;
    }
    const W = 900, H = 260, L = 64, R = 34, T = 12, B = 28;
    const s = svg(container, W, H, {
      "data-from-ms": fromMs, "data-to-ms": toMs, "data-bucket-ms": bucketMs,
      "aria-label": label,
    });
    const maxV = niceMax(Math.max(...series.flatMap((x) => x.points.map((p) => p.value))));
    const xOf = (t) => L + (W - L - R) * (t + bucketMs / 2 - fromMs) / (toMs - fromMs);
    const yOf = (v) => H - B - (H - T - B) * v / maxV;
    const grid = el("g", { class: "axis" }, s);
    for (let i = 0; i <= 4; i += 1) {
      const v = maxV * i / 4;
      el("line", { class: "grid", x1: L, x2: W - R, y1: yOf(v), y2: yOf(v) }, grid);
      text(grid, L - 6, yOf(v) + 4, fmtMs(v), { "text-anchor": "end" });
    }
    timeAxis(s, L, W - R, H - B, fromMs, toMs);
    series.forEach((line, i) => {
      const color = PALETTE[i % PALETTE.length];
      const g = el("g", { class: "series", "data-series": line.name }, s);
      const pts = line.points.slice().sort((a, b) => a.t_ms - b.t_ms);
      if (pts.length > 1) {
        el("polyline", {
          points: pts.map((p) => `${xOf(p.t_ms).toFixed(1)},${yOf(p.value).toFixed(1)}`).join(" "),
          fill: "none", stroke: color, "stroke-width": 2,
        }, g);
      }
      for (const p of pts) {
        const c = el("circle", Object.assign({
          class: "point", cx: xOf(p.t_ms).toFixed(1), cy: yOf(p.value).toFixed(1), r: 3.5,
          fill: color, "data-series": line.name, "data-t-ms": p.t_ms, "data-value": p.value,
        }, p.attrs || {}), g);
        title(c, `${line.name} ${fmtClock(p.t_ms)}: ${fmtMs(p.value)}`);
      }
    });
    legend(container, series.map((x) => x.name));
  }

  // cells: [{node, t_ms, bin, n}]; bin k holds values in [10^(k/5), 10^((k+1)/5)) s.
  function heatmap(container, opts) {
    const { cells, fromMs, toMs, bucketMs, binsPerDecade } = opts;
    if (!cells.length) {
      empty(container, "no token emissions in this window");
      return;
    }
    const nodes = [...new Set(cells.map((c) => c.node))].sort();
    const bins = cells.map((c) => c.bin);
    const lo = Math.min(...bins), hi = Math.max(...bins);
    const W = 900, L = 64, R = 34, rowH = 14, gap = 34;
    const bandH = (hi - lo + 1) * rowH;
    const H = nodes.length * (bandH + gap) + 10;
    const s = svg(container, W, H, {
      "data-from-ms": fromMs, "data-to-ms": toMs, "data-bucket-ms": bucketMs,
      "data-bins-per-decade": binsPerDecade, "aria-label": "ITL heatmap",
    });
    const maxN = Math.max(...cells.map((c) => c.n));
    const colW = (W - L - R) * bucketMs / (toMs - fromMs);
    nodes.forEach((node, i) => {
      const top = i * (bandH + gap) + 16;
      const g = el("g", { class: "heatmap", "data-node": node }, s);
      text(g, L, top - 4, node, { "font-weight": "600" });
      for (let b = lo; b <= hi; b += 1) {
        const y = top + (hi - b) * rowH;
        if ((b - lo) % 2 === 0 || hi === lo) {
          text(g, L - 6, y + rowH - 3, fmtMs(Math.pow(10, b / binsPerDecade)),
            { "text-anchor": "end" });
        }
      }
      el("rect", { x: L, y: top, width: W - L - R, height: bandH, fill: "#f4f6f9" }, g);
      for (const c of cells.filter((x) => x.node === node)) {
        const x = L + (W - L - R) * (c.t_ms - fromMs) / (toMs - fromMs);
        const shade = 0.15 + 0.85 * Math.log1p(c.n) / Math.log1p(maxN);
        const r = el("rect", {
          class: "cell", x: x.toFixed(1), y: top + (hi - c.bin) * rowH,
          width: Math.max(colW, 2).toFixed(1), height: rowH - 1,
          fill: "#2e6fdb", "fill-opacity": shade.toFixed(3),
          "data-node": node, "data-t-ms": c.t_ms, "data-bin": c.bin, "data-count": c.n,
        }, g);
        const lower = Math.pow(10, c.bin / binsPerDecade);
        const upper = Math.pow(10, (c.bin + 1) / binsPerDecade);
        title(r, `${node} ${fmtClock(c.t_ms)}: ${c.n} emissions with ITL ` +
          `${fmtMs(lower)}–${fmtMs(upper)}`);
      }
      if (i === nodes.length - 1) timeAxis(s, L, W - R, top + bandH + 2, fromMs, toMs);
    });
  }

  // bars: [{label, value, text, attrs}]; horizontal, value in bytes/s.
  function barChart(container, bars, label) {
    if (!bars.length) {
      empty(container, "no KV transfers in this window");
      return;
    }
    const W = 900, L = 200, R = 200, rowH = 26;
    const H = bars.length * rowH + 10;
    const s = svg(container, W, H, { "aria-label": label });
    const maxV = niceMax(Math.max(...bars.map((b) => b.value)));
    bars.forEach((bar, i) => {
      const y = 5 + i * rowH;
      const g = el("g", { class: "bar-row" }, s);
      text(g, L - 8, y + 16, bar.label, { "text-anchor": "end" });
      const r = el("rect", Object.assign({
        class: "bar", x: L, y: y + 3, height: rowH - 8,
        width: Math.max(1, (W - L - R) * bar.value / maxV).toFixed(1),
        fill: PALETTE[i % PALETTE.length], "data-value": bar.value,
      }, bar.attrs || {}), g);
      title(r, `${bar.label}: ${bar.text}`);
      text(g, L + (W - L - R) * bar.value / maxV + 6, y + 16, bar.text);
    });
  }

  // lanes: [{node, rows: [{label, spans: [{start_us, duration_us, name, attrs, tip}]}]}];
  // times in µs since the epoch, drawn relative to the first span.
  function waterfall(container, lanes, traceId) {
    const all = lanes.flatMap((l) => l.rows.flatMap((r) => r.spans));
    if (!all.length) {
      empty(container, "this trace has no spans");
      return;
    }
    const t0 = Math.min(...all.map((x) => x.start_us));
    const t1 = Math.max(...all.map((x) => x.start_us + x.duration_us));
    const total = Math.max(t1 - t0, 1);
    const W = 900, L = 230, R = 16, rowH = 22, laneGap = 10, top = 24;
    const rows = lanes.reduce((n, l) => n + l.rows.length, 0);
    const H = top + rows * rowH + lanes.length * laneGap + 30;
    const s = svg(container, W, H, {
      "data-trace-id": traceId, "data-t0-us": t0, "aria-label": "trace waterfall",
    });
    const xOf = (us) => L + (W - L - R) * (us - t0) / total;
    const g = el("g", { class: "axis" }, s);
    const step = niceMax(total / 1000 / 6) ;
    for (let ms = 0; ms <= total / 1000 + 1e-9; ms += step) {
      const x = xOf(t0 + ms * 1000);
      el("line", { class: "grid", x1: x, x2: x, y1: top - 4, y2: H - 24 }, g);
      text(g, x, 14, `${+ms.toFixed(3)} ms`, { "text-anchor": "middle" });
    }
    let y = top;
    lanes.forEach((lane, li) => {
      const color = PALETTE[li % PALETTE.length];
      const lg = el("g", { class: "lane", "data-node": lane.node }, s);
      text(lg, 4, y + 15, lane.node, { "font-weight": "600" });
      for (const row of lane.rows) {
        text(lg, 110, y + 15, row.label);
        for (const span of row.spans) {
          const r = el("rect", Object.assign({
            class: "span", x: xOf(span.start_us).toFixed(2), y: y + 3, height: rowH - 6,
            width: Math.max(1, xOf(span.start_us + span.duration_us) - xOf(span.start_us)).toFixed(2),
            fill: span.error ? "#d92d20" : color,
            "fill-opacity": span.name === "llm.token" ? 0.55 : 0.9,
            stroke: span.name === "llm.token" ? "#ffffff" : "none", "stroke-width": 0.5,
            "data-node": lane.node, "data-span-name": span.name,
          }, span.attrs || {}), lg);
          title(r, span.tip);
        }
        y += rowH;
      }
      y += laneGap;
    });
    text(s, L, H - 6, `${(total / 1000).toFixed(2)} ms from the first span's start to the last span's end`,
      { class: "empty" });
  }

  window.ttCharts = { lineChart, heatmap, barChart, waterfall, fmtMs, fmtBytesPerS, fmtClock };
})();
