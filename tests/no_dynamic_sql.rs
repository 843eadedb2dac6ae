//! A lint as a test: no SQL is ever built from request text.
//!
//! Every statement the gateway sends is either a `Stmt` constant (its SQL
//! a `&'static str`, so it cannot be assembled at run time) or a string
//! literal. This test reads every source file under `src/` and fails on
//! (1) a raw client call (`query`, `execute`, `batch_execute`,
//! `simple_query`, `prepare`, `copy_in`, …) whose SQL argument is not a
//! literal, a constant or a `Stmt`'s `.sql`, and (2) any `format!`,
//! `push_str`, `write!` or `+` that assembles text containing SQL keywords
//! at run time — except the few listed below, which interpolate only
//! numbers or constants. (`concat!` is fine: it runs at compile time.)

use std::path::{Path, PathBuf};

/// (file, text of the line): SQL assembled from numbers or constants only.
const ALLOWED: &[(&str, &str)] = &[
    // `fetch_view` takes `&Stmt` parameters: the callers pass their LIST
    // and LIST_BASIC constants (a Stmt is made only from `&'static str`).
    (
        "src/pagination.rs",
        "let rows = full.query(c, params).await?;",
    ),
    (
        "src/pagination.rs",
        "View::Basic => (basic.query(c, &params[..params.len() - 1]).await?, false),",
    ),
    // `lock_parents` takes a `&Stmt`: its callers pass LOCK_SESSIONS and
    // LOCK_RUNS (a Stmt is made only from `&'static str`).
    (
        "src/test_cases/executions_sql.rs",
        "for row in lock.query(c, &[&ids, &project]).await? {",
    ),
    // `totals::count` takes a `&Counter`: its two `Stmt`s come only from
    // the `counter!` macro (concat! of literals) in the areas' sql files.
    (
        "src/totals.rs",
        "let row = counter.exact.query_one(c, params).await?;",
    ),
    (
        "src/totals.rs",
        "let row = counter.estimate.query_one(c, params).await?;",
    ),
    // The statement timeout in milliseconds (a u128), not request text.
    ("src/db/mod.rs", "format!(\"SET statement_timeout = {}\""),
    ("src/db/mod.rs", "tx.batch_execute(&format!("),
    ("src/db/mod.rs", "\"SET LOCAL statement_timeout = {}\","),
    ("src/db/mod.rs", "\"SET statement_timeout = {}\","),
    (
        "src/db/mod.rs",
        "if object.batch_execute(&sql).await.is_err() {",
    ),
    (
        "src/db/mod.rs",
        "\"-c statement_timeout={} -c TimeZone=UTC -c jit=off\",",
    ),
    // verdict-bench --scale runs bench/scale/executions.sql, a file of this
    // repository (not request text), with its psql variables filled in.
    ("src/bin/verdict-bench.rs", "c.batch_execute(&sql).await?;"),
    // Constants of the embedded server and the notification channel.
    (
        "src/db/embedded.rs",
        ".batch_execute(&format!(\"CREATE DATABASE {DATABASE}\"))",
    ),
    (
        "src/db/notify.rs",
        ".batch_execute(&format!(\"LISTEN {SESSION_CHANNEL}\"))",
    ),
];

const RAW_CALLS: &[&str] = &[
    ".query(",
    ".query_one(",
    ".query_opt(",
    ".query_raw(",
    ".execute(",
    ".execute_raw(",
    ".batch_execute(",
    ".simple_query(",
    ".prepare(",
    ".prepare_cached(",
    ".prepare_typed(",
    ".copy_in(",
    ".copy_out(",
];

const SQL_WORDS: &[&str] = &[
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "DELETE ",
    "WHERE ",
    " FROM ",
    "SET ",
    "CREATE ",
    "DROP ",
    "ALTER ",
    "LISTEN ",
    "NOTIFY ",
    "COPY ",
    "ORDER BY",
    "LIMIT ",
    "statement_timeout",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn allowed(file: &str, line: &str) -> bool {
    ALLOWED
        .iter()
        .any(|(f, text)| *f == file && line.trim().contains(text))
}

/// The first argument of a call starting at `open` (the `(`), across lines.
fn first_argument(text: &str, open: usize) -> String {
    let mut depth = 0;
    let mut in_string = false;
    let mut prev = ' ';
    let mut arg = String::new();
    for c in text[open + 1..].chars() {
        if in_string {
            if c == '"' && prev != '\\' {
                in_string = false;
            }
        } else {
            match c {
                '"' => in_string = true,
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' if depth == 0 => break,
                ')' | ']' | '}' => depth -= 1,
                ',' if depth == 0 => break,
                _ => {}
            }
        }
        arg.push(c);
        prev = c;
    }
    arg.trim().to_owned()
}

/// The receiver of a method call ending just before `dot`.
fn receiver(text: &str, dot: usize) -> String {
    text[..dot]
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
        .collect::<String>()
        .chars()
        .rev()
        .collect()
}

fn is_stmt_const(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    !last.is_empty()
        && last
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

#[test]
fn no_sql_is_built_at_run_time_from_anything_but_constants() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    assert!(files.len() > 20);
    let mut problems = Vec::new();
    let mut raw_calls_checked = 0;
    for path in files {
        let file = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&path).unwrap();
        let line_of = |at: usize| text[..at].matches('\n').count();
        let lines: Vec<&str> = text.lines().collect();

        // (1) Raw client calls take a literal or a Stmt's SQL.
        for call in RAW_CALLS {
            for (at, _) in text.match_indices(call) {
                let line = lines[line_of(at)];
                if line.trim_start().starts_with("//") {
                    continue;
                }
                let recv = receiver(&text, at);
                if is_stmt_const(&recv) || recv == "self" {
                    // `CONST.query(client, params)`: a Stmt, checked by type.
                    continue;
                }
                let open = at + call.len() - 1;
                let arg = first_argument(&text, open);
                raw_calls_checked += 1;
                let literal = arg.starts_with('"')
                    || arg.starts_with("&\"")
                    || arg.starts_with("r\"")
                    || arg.starts_with("r#\"")
                    || is_stmt_const(arg.trim_start_matches('&'));
                let stmt_sql = arg.ends_with(".sql") || arg == "&stmt" || arg == "stmt";
                if !(literal || stmt_sql || allowed(&file, line)) {
                    problems.push(format!(
                        "{file}:{}: {call} with SQL {arg:?}",
                        line_of(at) + 1
                    ));
                }
                if arg.contains("format!") && !allowed(&file, line) {
                    problems.push(format!(
                        "{file}:{}: SQL built with format!",
                        line_of(at) + 1
                    ));
                }
            }
        }

        // (2) No text assembly that produces SQL.
        for (n, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let assembles = code.contains("format!(")
                || code.contains("push_str(")
                || code.contains("write!(")
                || code.contains("\" + ")
                || code.contains("+ \"")
                || code.contains("+ &");
            if !assembles {
                continue;
            }
            // The statement may continue on the next lines.
            let window = lines[n..(n + 3).min(lines.len())].join(" ");
            let sqlish = SQL_WORDS.iter().any(|w| {
                code.contains(w) || (code.trim_end().ends_with('(') && window.contains(w))
            });
            if sqlish && !allowed(&file, line) && !allowed(&file, lines.get(n + 1).unwrap_or(&"")) {
                problems.push(format!(
                    "{file}:{}: text assembly with SQL: {}",
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        raw_calls_checked > 3,
        "the scan found no raw call; is it still looking?"
    );
    assert!(problems.is_empty(), "dynamic SQL:\n{}", problems.join("\n"));
}

#[test]
fn the_lint_catches_sql_built_from_text() {
    let sample = r#"client.query(&format!("SELECT * FROM t WHERE a = '{x}'"), &[]).await"#;
    let open = sample.find(".query(").unwrap() + ".query(".len() - 1;
    assert!(first_argument(sample, open).contains("format!"));
    assert!(is_stmt_const("LIST_AUDIT"));
    assert!(!is_stmt_const("client"));
    assert_eq!(receiver("    tx.batch_execute", 6), "tx");
}
