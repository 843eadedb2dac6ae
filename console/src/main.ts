// Verdict's read-only console: pages over the API, called from the browser
// over gRPC-Web on the gateway's own origin. The API key typed into the page
// is kept in sessionStorage (this tab only) and sent as
// `authorization: Bearer …`; the project slug as `x-verdict-project`.
//
// Pages (hash routes):
//   #/sessions        the project's newest sessions, status live (WatchSession)
//   #/session/<id>    one session: live status, results, discrepancy summary
//                     (by severity, kind, resolution) and its discrepancies
//                     with their resolution state
//   #/runs            test runs with pass rate, and the new failures against
//                     the previous run of the same branch (CompareTestRuns)
//   #/flaky           the flakiest tests and pass rate (GetTestStatistics)
//   #/coverage        coverage trend of a branch (GetCoverageTrend)
//   #/metrics         a metric's time series (QueryTimeSeries)

import { createClient, Code, ConnectError, type Interceptor, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampDate, timestampFromMs, durationFromMs, type Timestamp } from "@bufbuild/protobuf/wkt";
import { SessionService, SessionStatus, type Session } from "../gen/verdict/v1/sessions_pb";
import { ResultService, ResultType, OverallStatus } from "../gen/verdict/v1/results_pb";
import { DiscrepancyService, Severity, Resolution, type DiscrepancyCount } from "../gen/verdict/v1/discrepancies_pb";
import { TestRunService, TestRunStatus, type TestRun } from "../gen/verdict/v1/test_runs_pb";
import { TestCaseService, ExecutionStatus } from "../gen/verdict/v1/test_cases_pb";
import { CoverageService, TrendInterval } from "../gen/verdict/v1/coverage_pb";
import { MetricsService } from "../gen/verdict/v1/metrics_pb";
import { lineChart, barChart } from "./charts";

const KEY = "verdict.apiKey";
const PROJECT = "verdict.project";
/** Most WatchSession streams open at once: over HTTP/1.1 a browser keeps
 * about six connections per origin, and each stream holds one. */
const MAX_WATCHES = 3;

const auth: Interceptor = (next) => async (req) => {
  const key = sessionStorage.getItem(KEY);
  if (key) req.header.set("authorization", `Bearer ${key}`);
  req.header.set("x-verdict-project", sessionStorage.getItem(PROJECT) || "default");
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [auth] });
const api = {
  sessions: createClient(SessionService, transport),
  results: createClient(ResultService, transport),
  discrepancies: createClient(DiscrepancyService, transport),
  runs: createClient(TestRunService, transport),
  tests: createClient(TestCaseService, transport),
  coverage: createClient(CoverageService, transport),
  metrics: createClient(MetricsService, transport),
};

// ---- small DOM helpers -------------------------------------------------------

type Child = Node | string | number | null | undefined;
function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
function table(head: string[], rows: Child[][], test: string, numeric: number[] = []): HTMLElement {
  return h(
    "table",
    { "data-test": test },
    h("thead", {}, h("tr", {}, ...head.map((c, i) => h("th", numeric.includes(i) ? { class: "num" } : {}, c)))),
    h("tbody", {}, ...rows.map((r) => h("tr", {}, ...r.map((c, i) => h("td", numeric.includes(i) ? { class: "num" } : {}, c))))),
  );
}
function card(label: string, value: string, test: string): HTMLElement {
  return h("div", { class: "card" }, h("div", { class: "value", "data-test": test }, value), h("div", { class: "label" }, label));
}
function badge(name: string): HTMLElement {
  return h("span", { class: `status status-${name}` }, name);
}
function when(t?: Timestamp): string {
  return t ? timestampDate(t).toISOString().replace("T", " ").slice(0, 19) : "";
}
export function pct(rate: number): string {
  return `${(rate * 100).toFixed(1)}%`;
}
function statusName(s: SessionStatus): string {
  return SessionStatus[s] ?? String(s);
}
function isFinal(s: SessionStatus): boolean {
  return s === SessionStatus.COMPLETED || s === SessionStatus.FAILED || s === SessionStatus.CANCELLED;
}

const main = document.getElementById("main")!;
/** Aborted when the page changes: ends its watches and stale renders. */
let pageAbort = new AbortController();

/** gRPC's name of a code (PERMISSION_DENIED), as the API docs spell it. */
function grpcCodeName(code: Code): string {
  return (Code[code] ?? String(code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function showError(e: unknown, where: string): HTMLElement {
  const err = ConnectError.from(e);
  const hint =
    err.code === Code.Unauthenticated
      ? " Enter an API key above."
      : err.code === Code.PermissionDenied
        ? " This key lacks the scope for it (the console needs `read`)."
        : "";
  return h("div", { class: "error", role: "alert", "data-test": "error" }, `${where}: ${grpcCodeName(err.code)}: ${err.rawMessage}.${hint}`);
}

async function render(page: () => Promise<HTMLElement[]>, title: string) {
  pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  // Not loaded until this render ends (a page shown again, e.g. after a
  // new key, must not look loaded while its call is still out).
  main.removeAttribute("data-loaded");
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    const content = await page();
    if (!signal.aborted) main.replaceChildren(h("h2", {}, title), ...content);
  } catch (e) {
    if (!signal.aborted) main.replaceChildren(h("h2", {}, title), showError(e, title));
  }
  if (!signal.aborted) main.setAttribute("data-loaded", title);
}

// ---- live status ----------------------------------------------------------------

/** Follows a session's status into `cell` until it is final or the page changes. */
function watch(id: string, cell: HTMLElement, signal: AbortSignal) {
  cell.classList.add("live");
  (async () => {
    try {
      for await (const ev of api.sessions.watchSession({ id }, { signal })) {
        if (ev.event.case === "session") {
          cell.replaceChildren(badge(statusName(ev.event.value.status)));
          cell.setAttribute("data-status", statusName(ev.event.value.status));
        }
      }
    } catch (e) {
      if (!signal.aborted) cell.append(h("span", { class: "muted", title: ConnectError.from(e).message }, " (watch ended)"));
    } finally {
      cell.classList.remove("live");
    }
  })();
}

// ---- pages ----------------------------------------------------------------------

async function sessionsPage(): Promise<HTMLElement[]> {
  const signal = pageAbort.signal;
  const list = await api.sessions.listSessions({ pageSize: 50 });
  let watches = 0;
  const rows = list.sessions.map((s: Session) => {
    const cell = h("td", { "data-status": statusName(s.status), "data-session": s.id }, badge(statusName(s.status)));
    if (!isFinal(s.status) && watches < MAX_WATCHES) {
      watches++;
      watch(s.id, cell, signal);
    }
    return h(
      "tr",
      {},
      h("td", {}, h("a", { href: `#/session/${s.id}` }, s.requestId)),
      h("td", {}, `${s.sourceTechnology} → ${s.targetTechnology}`),
      h("td", {}, s.validationScope),
      cell,
      h("td", {}, when(s.updatedAt)),
    );
  });
  const byStatus = new Map<string, number>();
  for (const s of list.sessions) byStatus.set(statusName(s.status), (byStatus.get(statusName(s.status)) ?? 0) + 1);
  return [
    h("div", { class: "cards" }, card("sessions shown", String(list.sessions.length), "session-count"), card("live watches", String(watches), "watch-count")),
    h(
      "table",
      { "data-test": "sessions" },
      h("thead", {}, h("tr", {}, ...["Request id", "Migration", "Scope", "Status", "Updated"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...rows),
    ),
    h("p", { class: "muted" }, `Newest 50. Status of up to ${MAX_WATCHES} unfinished sessions follows WatchSession live (●).`),
    h("h2", {}, "By status (when the page loaded)"),
    barChart([...byStatus].map(([label, value]) => ({ label, value })), { label: "sessions by status" }),
  ];
}

/** Counts keyed by name ("SEVERITY_HIGH"), charted without the prefix. */
function counts(items: DiscrepancyCount[], prefix: string, test: string): HTMLElement {
  return h(
    "div",
    { "data-test": test },
    barChart(
      items.map((c) => ({ label: c.key.startsWith(prefix) ? c.key.slice(prefix.length) : c.key, value: Number(c.count) })),
      { label: test },
    ),
  );
}

async function sessionPage(id: string): Promise<HTMLElement[]> {
  const signal = pageAbort.signal;
  const [got, results, summary, discrepancies] = await Promise.all([
    api.sessions.getSession({ lookup: { case: "id", value: id } }),
    api.results.listResults({ sessionId: id, pageSize: 100 }),
    api.discrepancies.summarizeDiscrepancies({ sessionId: id }),
    api.discrepancies.listDiscrepancies({ sessionId: id, pageSize: 100 }),
  ]);
  const s = got.session!;
  const statusCell = h("span", { "data-test": "session-status", "data-status": statusName(s.status) }, badge(statusName(s.status)));
  if (!isFinal(s.status)) watch(s.id, statusCell, signal);
  return [
    h(
      "div",
      { class: "cards" },
      card("request id", s.requestId, "request-id"),
      card("migration", `${s.sourceTechnology} → ${s.targetTechnology}`, "migration"),
      card("results", String(results.results.length), "result-count"),
      card("discrepancies", String(summary.total), "discrepancy-total"),
    ),
    h("p", {}, "Status: ", statusCell, ` · version ${s.version} · created ${when(s.createdAt)}`),
    h("h2", {}, "Results"),
    table(
      ["Type", "Status", "Fidelity", "Summary", "Time (ms)"],
      results.results.map((r) => [
        ResultType[r.resultType],
        badge(OverallStatus[r.overallStatus]),
        r.fidelityScore.toFixed(3),
        r.summary,
        String(r.executionTimeMs),
      ]),
      "results",
      [2, 4],
    ),
    h("h2", {}, "Discrepancies by severity"),
    counts(summary.bySeverity, "SEVERITY_", "by-severity"),
    h("h2", {}, "By kind"),
    counts(summary.byKind, "", "by-kind"),
    h("h2", {}, "By resolution (triage state)"),
    counts(summary.byResolution, "RESOLUTION_", "by-resolution"),
    h("h2", {}, "Discrepancies"),
    table(
      ["Severity", "Kind", "Description", "Resolution", "By", "Note"],
      discrepancies.discrepancies.map((d) => [
        badge(Severity[d.severity]),
        d.kind,
        d.description,
        badge(Resolution[d.resolution]),
        d.resolvedBy,
        d.resolutionNote,
      ]),
      "discrepancies",
    ),
  ];
}

async function runsPage(): Promise<HTMLElement[]> {
  const list = await api.runs.listTestRuns({ pageSize: 20 });
  // Listed runs carry no counts: GetTestRun computes them, one run each.
  const runs = await Promise.all(
    list.runs.map((r) => api.runs.getTestRun({ lookup: { case: "id", value: r.id } }).then((g) => g.run ?? r)),
  );
  // The previous run of a branch: the next older run of it in the list
  // (newest first).
  const previous = new Map<string, TestRun>();
  runs.forEach((run, i) => {
    const older = runs.slice(i + 1).find((r) => r.branch === run.branch);
    if (older) previous.set(run.id, older);
  });
  const compared = await Promise.all(
    runs.map((run) => {
      const base = previous.get(run.id);
      return base ? api.runs.compareTestRuns({ baseRunId: base.id, headRunId: run.id, maxItems: 20 }) : Promise.resolve(null);
    }),
  );
  const rows = runs.map((run, i) => {
    const c = run.counts;
    const cmp = compared[i];
    const newFailures = cmp
      ? h(
          "span",
          { "data-test": "new-failures", "data-count": String(cmp.counts?.newFailures ?? cmp.newFailures.length) },
          String(cmp.counts?.newFailures ?? cmp.newFailures.length),
          cmp.newFailures.length ? h("span", { class: "muted" }, ` (${cmp.newFailures.map((t) => t.testCaseKey).join(", ")})`) : null,
        )
      : h("span", { class: "muted", "data-test": "new-failures", "data-count": "" }, "no earlier run");
    return [
      run.name,
      run.branch,
      h("code", {}, run.commitSha.slice(0, 10)),
      badge(TestRunStatus[run.status]),
      String(c?.tests ?? 0n),
      String(c?.failed ?? 0n),
      h("span", { "data-test": "pass-rate" }, c ? pct(c.passRate) : ""),
      newFailures,
      when(run.startedAt),
    ];
  });
  const chronological = [...runs].reverse();
  return [
    table(["Run", "Branch", "Commit", "Status", "Tests", "Failed", "Pass rate", "New failures", "Started"], rows, "runs", [4, 5, 6]),
    h("h2", {}, "Pass rate by run"),
    lineChart(
      [...new Set(chronological.map((r) => r.branch))].map((branch) => ({
        name: branch,
        points: chronological
          .filter((r) => r.branch === branch && r.counts && r.startedAt)
          .map((r) => ({ x: timestampDate(r.startedAt!).getTime(), y: r.counts!.passRate * 100 })),
      })),
      { yMin: 0, yMax: 100, yFormat: (y) => `${y.toFixed(0)}%`, label: "pass rate by run" },
    ),
  ];
}

async function flakyPage(): Promise<HTMLElement[]> {
  const stats = await api.tests.getTestStatistics({ topFlaky: 20 });
  return [
    h(
      "div",
      { class: "cards" },
      card("executions", String(stats.totalExecutions), "total-executions"),
      card("pass rate", stats.passRate === undefined ? "–" : pct(stats.passRate), "overall-pass-rate"),
      card("flaky tests", String(stats.flakyTestCount), "flaky-count"),
    ),
    h("h2", {}, "Flakiest tests"),
    table(
      ["Test", "Name", "Flips", "Executions", "Flip rate"],
      stats.flakyTests.map((t) => [h("code", {}, t.testCaseKey), t.name, String(t.flips), String(t.executionsConsidered), pct(t.flipRate)]),
      "flaky",
      [2, 3, 4],
    ),
    barChart(
      stats.flakyTests.map((t) => ({ label: t.testCaseKey, value: t.flipRate * 100 })),
      { label: "flip rate", format: (v) => `${v.toFixed(1)}%`, max: 100 },
    ),
    h("h2", {}, "Executions by status"),
    barChart(
      stats.byStatus.map((b) => ({ label: ExecutionStatus[b.status], value: Number(b.count) })),
      { label: "executions by status" },
    ),
  ];
}

function param(name: string, fallback: string): string {
  const q = new URLSearchParams(location.hash.split("?")[1] ?? "");
  return q.get(name) || fallback;
}

function filterForm(fields: { name: string; value: string; label: string }[], route: string): HTMLElement {
  const form = h(
    "form",
    { class: "filters" },
    ...fields.map((f) => h("label", {}, `${f.label} `, h("input", { name: f.name, value: f.value, size: "16" }))),
    h("button", { type: "submit" }, "Show"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const f of fields) q.set(f.name, (form.querySelector(`[name=${f.name}]`) as HTMLInputElement).value);
    location.hash = `${route}?${q}`;
  });
  return form;
}

async function coveragePage(): Promise<HTMLElement[]> {
  const branch = param("branch", "main");
  const days = Number(param("days", "30"));
  const trend = await api.coverage.getCoverageTrend({ branch, interval: TrendInterval.DAILY, days });
  const buckets = trend.buckets.filter((b) => b.reportCount > 0n);
  const series = (["lines", "branches", "functions"] as const).map((k) => ({
    name: k,
    points: buckets
      .filter((b) => b.percentages?.[k] !== undefined && b.startTime)
      .map((b) => ({ x: timestampDate(b.startTime!).getTime(), y: b.percentages![k]! })),
  }));
  return [
    filterForm(
      [
        { name: "branch", value: branch, label: "Branch" },
        { name: "days", value: String(days), label: "Days" },
      ],
      "#/coverage",
    ),
    lineChart(series, { yMin: 0, yMax: 100, yFormat: (y) => `${y.toFixed(0)}%`, label: "coverage trend" }),
    table(
      ["Day", "Reports", "Lines", "Branches", "Functions"],
      buckets.map((b) => [
        when(b.startTime).slice(0, 10),
        String(b.reportCount),
        h("span", { "data-test": "lines-pct" }, b.percentages?.lines?.toFixed(1) ?? ""),
        b.percentages?.branches?.toFixed(1) ?? "",
        b.percentages?.functions?.toFixed(1) ?? "",
      ]),
      "coverage",
      [1, 2, 3, 4],
    ),
  ];
}

async function metricsPage(): Promise<HTMLElement[]> {
  const name = param("name", "");
  const hours = Number(param("hours", "24"));
  const form = filterForm(
    [
      { name: "name", value: name, label: "Metric" },
      { name: "hours", value: String(hours), label: "Hours" },
    ],
    "#/metrics",
  );
  if (!name) return [form, h("p", { class: "muted" }, "Name a metric (e.g. migration.duration_ms) to chart it.")];
  const end = Date.now();
  const bucketMs = Math.max(60_000, Math.ceil((hours * 3600_000) / 48 / 60_000) * 60_000);
  const series = await api.metrics.queryTimeSeries({
    name,
    range: { startTime: timestampFromMs(end - hours * 3600_000), endTime: timestampFromMs(end) },
    bucketWidth: durationFromMs(bucketMs),
  });
  const buckets = series.buckets.filter((b) => b.count > 0n && b.startTime);
  const pts = (f: (b: (typeof buckets)[number]) => number | undefined) =>
    buckets.filter((b) => f(b) !== undefined).map((b) => ({ x: timestampDate(b.startTime!).getTime(), y: f(b)! }));
  return [
    form,
    lineChart(
      [
        { name: "avg", points: pts((b) => b.avg) },
        { name: "min", points: pts((b) => b.min) },
        { name: "max", points: pts((b) => b.max) },
      ],
      { label: `${name} over time` },
    ),
    table(
      ["Bucket start", "Points", "Avg", "Min", "Max"],
      buckets.map((b) => [when(b.startTime), String(b.count), h("span", { "data-test": "avg" }, b.avg?.toFixed(2) ?? ""), b.min?.toFixed(2) ?? "", b.max?.toFixed(2) ?? ""]),
      "series",
      [1, 2, 3, 4],
    ),
  ];
}

// ---- routing and the key form --------------------------------------------------

function route() {
  const hash = location.hash || "#/sessions";
  const [path] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] ?? "sessions";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("data-page") === page || (page === "session" && a.getAttribute("data-page") === "sessions"));
  switch (page) {
    case "session":
      return render(() => sessionPage(parts[1] ?? ""), "Session");
    case "runs":
      return render(runsPage, "Test runs");
    case "flaky":
      return render(flakyPage, "Flaky tests");
    case "coverage":
      return render(coveragePage, "Coverage trend");
    case "metrics":
      return render(metricsPage, "Metric time series");
    default:
      return render(sessionsPage, "Sessions");
  }
}

const keyInput = document.getElementById("key") as HTMLInputElement;
const projectInput = document.getElementById("project") as HTMLInputElement;
projectInput.value = sessionStorage.getItem(PROJECT) || "default";
keyInput.value = sessionStorage.getItem(KEY) ?? "";
document.getElementById("auth")!.addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, keyInput.value.trim());
  sessionStorage.setItem(PROJECT, projectInput.value.trim() || "default");
  route();
});
document.getElementById("forget")!.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  keyInput.value = "";
  route();
});
window.addEventListener("hashchange", route);
route();
