// The console in a real browser against a real gateway (run by
// scripts/browser.sh, bundled for Node by esbuild): seeds data through the
// API over gRPC-Web, loads every console page in Chromium (playwright-core),
// checks that what each page shows equals what the API returns, saves a
// screenshot of each page, and checks that a key without the `read` scope
// (and no key at all) sees an error, not data.
//
//   node browser.mjs <gateway base URL> <key with read+write> <key with write only> <screenshot dir> <chromium path>
//
// Ends with "browser: N passed, M failed".

import { createClient, ConnectError, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { timestampFromMs, durationFromMs } from "@bufbuild/protobuf/wkt";
import { chromium, type Page } from "playwright-core";
import { mkdirSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { SessionService, SessionStatus } from "../gen/verdict/v1/sessions_pb";
import { ResultService, ResultType, OverallStatus } from "../gen/verdict/v1/results_pb";
import { DiscrepancyService, Severity, Resolution } from "../gen/verdict/v1/discrepancies_pb";
import { TestRunService, TestRunStatus } from "../gen/verdict/v1/test_runs_pb";
import { TestCaseService, ExecutionStatus, TestType } from "../gen/verdict/v1/test_cases_pb";
import { CoverageService, TrendInterval } from "../gen/verdict/v1/coverage_pb";
import { MetricsService } from "../gen/verdict/v1/metrics_pb";

const [baseUrl, fullKey, writeKey, shots, chromiumPath] = process.argv.slice(2);
const auth: Interceptor = (next) => async (req) => {
  req.header.set("authorization", `Bearer ${fullKey}`);
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl, interceptors: [auth] });
const api = {
  sessions: createClient(SessionService, transport),
  results: createClient(ResultService, transport),
  discrepancies: createClient(DiscrepancyService, transport),
  runs: createClient(TestRunService, transport),
  tests: createClient(TestCaseService, transport),
  coverage: createClient(CoverageService, transport),
  metrics: createClient(MetricsService, transport),
};

let passed = 0;
let failed = 0;
function check(name: string, ok: boolean, detail: unknown = "") {
  if (ok) {
    passed++;
    console.log(`browser: ok: ${name}`);
  } else {
    failed++;
    console.error(`browser: FAILED: ${name}`, JSON.stringify(detail, (_, v) => (typeof v === "bigint" ? String(v) : v)));
  }
}
const pct = (rate: number) => `${(rate * 100).toFixed(1)}%`;
const same = (a: unknown[], b: unknown[]) => JSON.stringify(a) === JSON.stringify(b);

// ---- seed data, through the API ------------------------------------------------

const HOUR = 3600_000;
const now = Date.now();

async function seed() {
  const mk = (requestId: string) =>
    api.sessions
      .createSession({ requestId, sourceTechnology: "cobol", targetTechnology: "java", validationScope: "full" })
      .then((r) => r.session!);
  const live = await mk("billing-batch");
  const done = await mk("ledger-posting");
  const busy = await mk("customer-master");
  await api.sessions.updateSessionStatus({ id: busy.id, status: SessionStatus.PROCESSING });
  await api.sessions.updateSessionStatus({ id: done.id, status: SessionStatus.PROCESSING });

  const r1 = await api.results.recordResult({
    sessionId: done.id, requestId: "ledger-static", resultType: ResultType.STATIC, overallStatus: OverallStatus.PASSED,
    fidelityScore: 0.97, summary: "structure matches", executionTimeMs: 1200n,
  });
  await api.results.recordResult({
    sessionId: done.id, requestId: "ledger-behavioral", resultType: ResultType.BEHAVIORAL, overallStatus: OverallStatus.WARNING,
    fidelityScore: 0.81, summary: "rounding differs on 3 of 400 cases", executionTimeMs: 5400n,
  });
  const resultId = r1.result!.id;
  const recorded = await api.discrepancies.recordDiscrepancies({
    sessionId: done.id,
    batchId: randomUUID(),
    items: [
      { resultId, kind: "numeric_precision", severity: Severity.HIGH, description: "COMP-3 rounding in INTCALC", confidence: 0.9, fingerprint: "fp-round" },
      { resultId, kind: "numeric_precision", severity: Severity.MEDIUM, description: "truncation in FEECALC", confidence: 0.8, fingerprint: "fp-trunc" },
      { resultId, kind: "missing_branch", severity: Severity.CRITICAL, description: "EVALUATE OTHER branch not migrated", confidence: 0.95, fingerprint: "fp-branch" },
      { resultId, kind: "naming", severity: Severity.LOW, description: "field renamed", confidence: 0.6, fingerprint: "fp-name" },
    ],
  });
  const ids = recorded.ids;
  await api.discrepancies.resolveDiscrepancy({ id: ids[3], resolution: Resolution.RESOLVED, actor: "ana", note: "renamed on purpose" });
  await api.discrepancies.resolveDiscrepancy({ id: ids[0], resolution: Resolution.ACKNOWLEDGED, actor: "bo", note: "fix in sprint 12" });
  await api.sessions.updateSessionStatus({ id: done.id, status: SessionStatus.COMPLETED });

  const keys = ["login", "checkout", "search"];
  for (const key of keys) {
    await api.tests.createTestCase({ key, name: `${key} flow`, testType: TestType.INTEGRATION, targetSubsystem: "web" });
  }
  // Two runs of main: checkout breaks in the second (a new failure); search
  // flips between them (flaky).
  const outcomes = [
    { login: ExecutionStatus.PASSED, checkout: ExecutionStatus.PASSED, search: ExecutionStatus.FAILED },
    { login: ExecutionStatus.PASSED, checkout: ExecutionStatus.FAILED, search: ExecutionStatus.PASSED },
  ];
  for (const [i, outcome] of outcomes.entries()) {
    const started = now - (3 - i) * HOUR;
    const run = (
      await api.runs.createTestRun({
        clientKey: `ci-${i + 1}`, name: `nightly #${i + 1}`, buildNumber: String(i + 1), commitSha: `abcdef${i}1234`,
        branch: "main", startedAt: timestampFromMs(started),
      })
    ).run!;
    await api.tests.recordExecutions({
      batchId: randomUUID(),
      items: keys.map((key) => ({
        testCase: { case: "testCaseKey" as const, value: key }, status: outcome[key as keyof typeof outcome],
        startedAt: timestampFromMs(started + 1000), durationMs: 1500n, runId: run.id, attempt: 1,
        errorMessage: outcome[key as keyof typeof outcome] === ExecutionStatus.FAILED ? "assertion failed" : "",
      })),
    });
    await api.runs.finishTestRun({ id: run.id, finishedAt: timestampFromMs(started + 60_000) });
  }
  // More flips of search, outside runs.
  await api.tests.recordExecutions({
    batchId: randomUUID(),
    items: [ExecutionStatus.FAILED, ExecutionStatus.PASSED, ExecutionStatus.FAILED].map((status, j) => ({
      testCase: { case: "testCaseKey" as const, value: "search" }, status, startedAt: timestampFromMs(now - HOUR + j * 60_000), durationMs: 900n,
    })),
  });

  for (const [d, lines] of [[3, 700], [2, 760], [1, 820]] as const) {
    await api.coverage.recordCoverage({
      commitSha: `c0ffee${d}00`, branch: "main", clientKey: `cov-${d}`, recordedAt: timestampFromMs(now - d * 24 * HOUR),
      totals: { linesCovered: BigInt(lines), linesTotal: 1000n, branchesCovered: BigInt(lines / 2), branchesTotal: 1000n, functionsCovered: 90n, functionsTotal: 100n },
    });
  }
  // Two points per hour, a minute apart, inside one half hour of the clock:
  // the metrics page's buckets are half hours, so the pair must not
  // straddle one's edge whatever the time the test runs at.
  const halfHour = HOUR / 2;
  const slot = Math.floor(now / halfHour) * halfHour + 5 * 60_000;
  await api.metrics.recordMetricPoints({
    batchId: randomUUID(),
    points: [5, 4, 3, 2, 1].flatMap((hoursAgo) => [
      { name: "migration.duration_ms", value: 1000 + hoursAgo * 100, unit: "ms", recordedAt: timestampFromMs(slot - hoursAgo * HOUR) },
      { name: "migration.duration_ms", value: 1400 + hoursAgo * 50, unit: "ms", recordedAt: timestampFromMs(slot - hoursAgo * HOUR + 60_000) },
    ]),
  });
  return { live, done };
}

// ---- the pages -------------------------------------------------------------------

async function loaded(page: Page, title: string) {
  await page.waitForSelector(`main[data-loaded="${title}"]`, { timeout: 15_000 });
}
async function texts(page: Page, selector: string): Promise<string[]> {
  return page.locator(selector).allTextContents();
}
async function shot(page: Page, name: string) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

async function main() {
  mkdirSync(shots, { recursive: true });
  const { live, done } = await seed();
  const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const consoleErrors: string[] = [];
    page.on("pageerror", (e) => consoleErrors.push(String(e)));

    await page.goto(`${baseUrl}/console/`);
    await page.fill("#key", fullKey);
    await page.click("#auth button[type=submit]");
    await loaded(page, "Sessions");

    // Sessions, with live status.
    const list = await api.sessions.listSessions({ pageSize: 50 });
    const shown = await page.locator("table[data-test=sessions] tbody td[data-session]").evaluateAll((cells) =>
      cells.map((c) => [c.getAttribute("data-session"), c.getAttribute("data-status")]),
    );
    check(
      "sessions page lists the API's sessions with their statuses",
      same(shown, list.sessions.map((s) => [s.id, SessionStatus[s.status]])),
      { shown, api: list.sessions.map((s) => [s.id, SessionStatus[s.status]]) },
    );
    // The live cell must be watching before the change, or the change would
    // only show on a reload.
    await page.waitForSelector(`td[data-session="${live.id}"].live`, { timeout: 10_000 });
    await api.sessions.updateSessionStatus({ id: live.id, status: SessionStatus.PROCESSING });
    const moved = await page
      .waitForSelector(`td[data-session="${live.id}"][data-status="PROCESSING"]`, { timeout: 10_000 })
      .then(() => true, () => false);
    check("a status change made through the API appears live (WatchSession over gRPC-Web)", moved);
    await shot(page, "sessions");
    check("the key is kept for the tab only", await page.evaluate(() => localStorage.length === 0 && sessionStorage.getItem("verdict.apiKey") !== null));

    // One session.
    await page.goto(`${baseUrl}/console/#/session/${done.id}`);
    await loaded(page, "Session");
    const summary = await api.discrepancies.summarizeDiscrepancies({ sessionId: done.id });
    const results = await api.results.listResults({ sessionId: done.id, pageSize: 100 });
    const discrepancies = await api.discrepancies.listDiscrepancies({ sessionId: done.id, pageSize: 100 });
    check("session page: discrepancy total", (await texts(page, "[data-test=discrepancy-total]"))[0] === String(summary.total), summary.total);
    check("session page: result count", (await texts(page, "[data-test=result-count]"))[0] === String(results.results.length));
    check("session page: status", (await page.getAttribute("[data-test=session-status]", "data-status")) === "COMPLETED");
    const resolutions = await texts(page, "table[data-test=discrepancies] tbody tr td:nth-child(4)");
    check(
      "session page: each discrepancy's resolution state",
      same(resolutions, discrepancies.discrepancies.map((d) => Resolution[d.resolution])),
      { resolutions },
    );
    const bySeverity = await texts(page, "[data-test=by-severity] text");
    const expected = summary.bySeverity.flatMap((c) => [c.key.replace("SEVERITY_", ""), String(c.count)]);
    check("session page: severity chart shows the summary's counts", same(bySeverity, expected), { bySeverity, expected });
    await shot(page, "session");

    // Test runs.
    await page.goto(`${baseUrl}/console/#/runs`);
    await loaded(page, "Test runs");
    const listed = (await api.runs.listTestRuns({ pageSize: 20 })).runs;
    const runs = await Promise.all(listed.map((r) => api.runs.getTestRun({ lookup: { case: "id", value: r.id } }).then((g) => g.run!)));
    check(
      "runs page: pass rate of each run",
      same(await texts(page, "[data-test=pass-rate]"), runs.map((r) => pct(r.counts!.passRate))),
      await texts(page, "[data-test=pass-rate]"),
    );
    const cmp = await api.runs.compareTestRuns({ baseRunId: runs[1].id, headRunId: runs[0].id, maxItems: 20 });
    const newFailures = await page.locator("[data-test=new-failures]").first().getAttribute("data-count");
    check(
      "runs page: new failures against the previous run of the branch",
      newFailures === String(cmp.counts!.newFailures) && cmp.newFailures.map((t) => t.testCaseKey).join() === "checkout",
      { newFailures, api: cmp.newFailures.map((t) => t.testCaseKey) },
    );
    await shot(page, "runs");

    // Flaky tests.
    await page.goto(`${baseUrl}/console/#/flaky`);
    await loaded(page, "Flaky tests");
    const stats = await api.tests.getTestStatistics({ topFlaky: 20 });
    check("flaky page: total executions", (await texts(page, "[data-test=total-executions]"))[0] === String(stats.totalExecutions));
    check(
      "flaky page: the flakiest tests in order",
      same(await texts(page, "table[data-test=flaky] tbody td:first-child"), stats.flakyTests.map((t) => t.testCaseKey)) && stats.flakyTests.length > 0,
      stats.flakyTests.map((t) => t.testCaseKey),
    );
    await shot(page, "flaky");

    // Coverage trend.
    await page.goto(`${baseUrl}/console/#/coverage?branch=main&days=30`);
    await loaded(page, "Coverage trend");
    const trend = await api.coverage.getCoverageTrend({ branch: "main", interval: TrendInterval.DAILY, days: 30 });
    const lines = trend.buckets.filter((b) => b.reportCount > 0n).map((b) => b.percentages!.lines!.toFixed(1));
    check("coverage page: line coverage per day", same(await texts(page, "[data-test=lines-pct]"), lines) && lines.length === 3, lines);
    await shot(page, "coverage");

    // Metric time series.
    await page.goto(`${baseUrl}/console/#/metrics?name=migration.duration_ms&hours=24`);
    await loaded(page, "Metric time series");
    const shownAvg = await texts(page, "[data-test=avg]");
    check("metrics page: a bucket per recorded hour", shownAvg.length === 5, shownAvg);
    const end = Date.now();
    const bucketMs = Math.max(60_000, Math.ceil((24 * HOUR) / 48 / 60_000) * 60_000);
    const series = await api.metrics.queryTimeSeries({
      name: "migration.duration_ms",
      range: { startTime: timestampFromMs(end - 24 * HOUR), endTime: timestampFromMs(end) },
      bucketWidth: durationFromMs(bucketMs),
    });
    check(
      "metrics page: bucket averages",
      same(shownAvg, series.buckets.filter((b) => b.count > 0n).map((b) => b.avg!.toFixed(2))),
      shownAvg,
    );
    await shot(page, "metrics");
    check("no script error on any page", consoleErrors.length === 0, consoleErrors);

    // A key without `read`, and no key: an error, no data.
    for (const [who, key, code] of [["a write-only key", writeKey, "PERMISSION_DENIED"], ["no key", "", "UNAUTHENTICATED"]] as const) {
      const other = await browser.newContext({ viewport: { width: 1280, height: 500 } });
      const p = await other.newPage();
      await p.goto(`${baseUrl}/console/`);
      await p.fill("#key", key);
      await p.click("#auth button[type=submit]");
      await loaded(p, "Sessions");
      const error = (await texts(p, "[data-test=error]"))[0] ?? "";
      const rows = await p.locator("table[data-test=sessions]").count();
      check(`${who} sees ${code}, not data`, error.includes(code) && rows === 0, { error, rows });
      if (key) await shot(p, "denied");
      await other.close();
    }
  } finally {
    await browser.close();
  }
}

main()
  .catch((e) => {
    failed++;
    console.error("browser: FAILED:", e instanceof ConnectError ? `${e.code} ${e.message}` : e);
  })
  .finally(() => {
    console.log(`browser: ${passed} passed, ${failed} failed`);
    process.exitCode = failed === 0 ? 0 : 1;
  });
