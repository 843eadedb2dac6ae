// Hand-rolled SVG charts (no charting library): a line chart for time
// series and a horizontal bar chart for counts. Colours are SVG attributes,
// not style attributes, so the console's Content-Security-Policy
// (style-src 'self') holds.

const SVG = "http://www.w3.org/2000/svg";
export const COLORS = ["#2457c5", "#1b7f3b", "#b54708", "#7a5af8"];

function el(name: string, attrs: Record<string, string | number>, text?: string): SVGElement {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

export interface Series {
  name: string;
  points: { x: number; y: number }[];
}

/** A line chart of `series` over time (x in ms since the epoch). */
export function lineChart(
  series: Series[],
  opts: { yMin?: number; yMax?: number; yFormat?: (y: number) => string; width?: number; height?: number; label: string },
): HTMLElement {
  const width = opts.width ?? 900;
  const height = opts.height ?? 240;
  const pad = { left: 56, right: 16, top: 12, bottom: 28 };
  const all = series.flatMap((s) => s.points);
  const wrap = document.createElement("div");
  const svg = el("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label });
  wrap.append(svg);
  if (all.length === 0) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data"));
    return wrap;
  }
  const xs = all.map((p) => p.x);
  const ys = all.map((p) => p.y);
  let x0 = Math.min(...xs);
  let x1 = Math.max(...xs);
  if (x0 === x1) {
    x0 -= 3600_000;
    x1 += 3600_000;
  }
  let y0 = opts.yMin ?? Math.min(0, ...ys);
  let y1 = opts.yMax ?? Math.max(...ys);
  if (y0 === y1) y1 = y0 + 1;
  const fmt = opts.yFormat ?? ((y: number) => String(Math.round(y * 100) / 100));
  const sx = (x: number) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y: number) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.append(el("line", { x1: pad.left, x2: width - pad.right, y1: sy(y), y2: sy(y), stroke: "#e4e8ee" }));
    svg.append(el("text", { x: pad.left - 6, y: sy(y) + 4, "text-anchor": "end" }, fmt(y)));
  }
  for (const [x, anchor] of [[x0, "start"], [(x0 + x1) / 2, "middle"], [x1, "end"]] as const) {
    const d = new Date(x);
    const label = `${d.toISOString().slice(5, 10)} ${d.toISOString().slice(11, 16)}`;
    svg.append(el("text", { x: sx(x), y: height - 8, "text-anchor": anchor }, label));
  }
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = [...s.points].sort((a, b) => a.x - b.x);
    svg.append(
      el("polyline", {
        points: pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" "),
        fill: "none",
        stroke: color,
        "stroke-width": 2,
      }),
    );
    for (const p of pts) {
      const dot = el("circle", { cx: sx(p.x), cy: sy(p.y), r: 3, fill: color });
      dot.append(el("title", {}, `${s.name}: ${fmt(p.y)} at ${new Date(p.x).toISOString()}`));
      svg.append(dot);
    }
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("span");
    const sw = document.createElement("i");
    sw.className = `swatch-${i % COLORS.length}`;
    item.append(sw, s.name);
    legend.append(item);
  });
  wrap.append(legend);
  return wrap;
}

/** A horizontal bar chart of labelled counts. */
export function barChart(items: { label: string; value: number }[], opts: { label: string; format?: (v: number) => string; max?: number }): HTMLElement {
  const width = 600;
  const row = 22;
  const labelWidth = 200;
  const height = Math.max(row, items.length * row) + 8;
  const max = opts.max ?? Math.max(1, ...items.map((i) => i.value));
  const fmt = opts.format ?? ((v: number) => String(v));
  const wrap = document.createElement("div");
  const svg = el("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": opts.label });
  items.forEach((item, i) => {
    const y = 4 + i * row;
    const w = ((width - labelWidth - 70) * item.value) / max;
    svg.append(el("text", { x: labelWidth - 6, y: y + 14, "text-anchor": "end" }, item.label));
    svg.append(el("rect", { x: labelWidth, y: y + 3, width: Math.max(1, w), height: row - 8, fill: COLORS[0] }));
    svg.append(el("text", { x: labelWidth + w + 6, y: y + 14 }, fmt(item.value)));
  });
  wrap.append(svg);
  return wrap;
}
