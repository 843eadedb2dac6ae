//! The scope every RPC requires, declared in one table.
//!
//! `read` covers Get/List/Watch/Query/Summarize/Statistics/Export, `write`
//! covers Record/Create/Update/Resolve/Ingest/Delete/Append, `admin` covers
//! AdminService, Cleanup, ComputeRollups and key management. Health and
//! reflection are open and not listed. A test enumerates every RPC of every
//! service in `proto/` and fails when one has no row here; at run time an
//! RPC without a row requires `admin` (fail closed, yet usable by admins).
//!
//! Rows for services that are not built yet are declared ahead, so a new
//! service only needs new rows when it adds RPCs beyond the design.

use super::Scope::{self, Admin, Read, Write};

/// `(full gRPC path, required scope)`.
pub const TABLE: &[(&str, Scope)] = &[
    // SessionService
    ("/verdict.v1.SessionService/CreateSession", Write),
    ("/verdict.v1.SessionService/GetSession", Read),
    ("/verdict.v1.SessionService/ListSessions", Read),
    ("/verdict.v1.SessionService/UpdateSessionStatus", Write),
    ("/verdict.v1.SessionService/AppendSessionLog", Write),
    ("/verdict.v1.SessionService/ListSessionLogs", Read),
    ("/verdict.v1.SessionService/DeleteSession", Write),
    ("/verdict.v1.SessionService/WatchSession", Read),
    // ResultService
    ("/verdict.v1.ResultService/RecordResult", Write),
    ("/verdict.v1.ResultService/GetResult", Read),
    ("/verdict.v1.ResultService/ListResults", Read),
    // DiscrepancyService
    ("/verdict.v1.DiscrepancyService/RecordDiscrepancies", Write),
    ("/verdict.v1.DiscrepancyService/IngestDiscrepancies", Write),
    ("/verdict.v1.DiscrepancyService/GetIngestStatus", Read),
    ("/verdict.v1.DiscrepancyService/ListDiscrepancies", Read),
    ("/verdict.v1.DiscrepancyService/ResolveDiscrepancy", Write),
    ("/verdict.v1.DiscrepancyService/ListResolutionHistory", Read),
    (
        "/verdict.v1.DiscrepancyService/SummarizeDiscrepancies",
        Read,
    ),
    ("/verdict.v1.DiscrepancyService/GetDiscrepancy", Read),
    // TestCaseService
    ("/verdict.v1.TestCaseService/CreateTestCase", Write),
    ("/verdict.v1.TestCaseService/GetTestCase", Read),
    ("/verdict.v1.TestCaseService/ListTestCases", Read),
    ("/verdict.v1.TestCaseService/UpdateTestCase", Write),
    ("/verdict.v1.TestCaseService/DeleteTestCase", Write),
    ("/verdict.v1.TestCaseService/RecordExecutions", Write),
    ("/verdict.v1.TestCaseService/IngestExecutions", Write),
    ("/verdict.v1.TestCaseService/GetIngestStatus", Read),
    ("/verdict.v1.TestCaseService/ListExecutions", Read),
    ("/verdict.v1.TestCaseService/GetTestStatistics", Read),
    ("/verdict.v1.TestCaseService/GetExecution", Read),
    // CoverageService
    ("/verdict.v1.CoverageService/RecordCoverage", Write),
    ("/verdict.v1.CoverageService/GetAggregateCoverage", Read),
    ("/verdict.v1.CoverageService/GetCoverageTrend", Read),
    ("/verdict.v1.CoverageService/CompareCoverage", Read),
    ("/verdict.v1.CoverageService/GetCoverageReport", Read),
    ("/verdict.v1.CoverageService/ListCoverageFiles", Read),
    ("/verdict.v1.CoverageService/ListCoverageReports", Read),
    // MetricsService
    ("/verdict.v1.MetricsService/RecordMetricPoints", Write),
    ("/verdict.v1.MetricsService/QueryTimeSeries", Read),
    ("/verdict.v1.MetricsService/ComputeRollups", Admin),
    ("/verdict.v1.MetricsService/ListRollups", Read),
    ("/verdict.v1.MetricsService/GetTechnologyUsage", Read),
    ("/verdict.v1.MetricsService/ListMetricPoints", Read),
    // AdminService: all of it is admin.
    ("/verdict.v1.AdminService/ListAuditEvents", Admin),
    ("/verdict.v1.AdminService/GetStats", Admin),
    ("/verdict.v1.AdminService/Cleanup", Admin),
    ("/verdict.v1.AdminService/CheckIntegrity", Admin),
    ("/verdict.v1.AdminService/GetMigrationStatus", Admin),
    ("/verdict.v1.AdminService/ExportSession", Admin),
    // TestRunService
    ("/verdict.v1.TestRunService/CreateTestRun", Write),
    ("/verdict.v1.TestRunService/GetTestRun", Read),
    ("/verdict.v1.TestRunService/ListTestRuns", Read),
    ("/verdict.v1.TestRunService/FinishTestRun", Write),
    ("/verdict.v1.TestRunService/CompareTestRuns", Read),
    // FailureService
    ("/verdict.v1.FailureService/ListFailureSignatures", Read),
    ("/verdict.v1.FailureService/TriageFailureSignature", Write),
    ("/verdict.v1.FailureService/TriageExecution", Write),
    ("/verdict.v1.FailureService/ListTriageHistory", Read),
    // ProjectService: all of it is admin.
    ("/verdict.v1.ProjectService/CreateProject", Admin),
    ("/verdict.v1.ProjectService/GetProject", Admin),
    ("/verdict.v1.ProjectService/ListProjects", Admin),
    ("/verdict.v1.ProjectService/UpdateProject", Admin),
    ("/verdict.v1.ProjectService/DeleteProject", Admin),
];

/// How a path is treated by the auth layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health and reflection: no key needed.
    Open,
    /// Needs a key holding this scope; `rpc` is the table's copy of the path.
    Needs { scope: Scope, rpc: &'static str },
}

/// Services that stay open: probes and grpcurl need them without a key.
pub fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The access rule of a request path.
pub fn access(path: &str) -> Access {
    if is_open(path) {
        return Access::Open;
    }
    match TABLE.iter().find(|(p, _)| *p == path) {
        Some((rpc, scope)) => Access::Needs { scope: *scope, rpc },
        None => Access::Needs {
            scope: Admin,
            rpc: "",
        },
    }
}

/// Whether a row declares `path`.
pub fn declared(path: &str) -> bool {
    TABLE.iter().any(|(p, _)| *p == path)
}

/// Every RPC of every service in an encoded descriptor set, as full paths.
pub fn rpc_paths(encoded_descriptor_set: &[u8]) -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(encoded_descriptor_set) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for file in &set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                let service_name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                paths.push(format!("/{service_name}/{}", method.name()));
            }
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_every_service_has_a_declared_scope() {
        let paths = rpc_paths(crate::proto::FILE_DESCRIPTOR_SET);
        assert!(paths.len() >= 17, "the descriptor set lists {paths:?}");
        let missing: Vec<&String> = paths.iter().filter(|p| !declared(p)).collect();
        assert!(
            missing.is_empty(),
            "RPCs without a scope in src/auth/scopes.rs: {missing:?}"
        );
    }

    #[test]
    fn no_path_is_declared_twice() {
        for (i, (p, _)) in TABLE.iter().enumerate() {
            assert!(
                !TABLE[i + 1..].iter().any(|(q, _)| q == p),
                "{p} is declared twice"
            );
        }
    }

    #[test]
    fn scopes_follow_the_verb_of_the_rpc() {
        for (path, scope) in TABLE {
            let method = path.rsplit('/').next().unwrap();
            let admin_only = path.contains("AdminService")
                || path.contains("ProjectService")
                || method.starts_with("Cleanup")
                || method.starts_with("ComputeRollups");
            let expected = if admin_only {
                Admin
            } else if [
                "Record", "Create", "Update", "Resolve", "Ingest", "Delete", "Append", "Finish",
                "Triage",
            ]
            .iter()
            .any(|verb| method.starts_with(verb))
            {
                Write
            } else {
                Read
            };
            assert_eq!(*scope, expected, "{path}");
        }
    }

    #[test]
    fn health_and_reflection_are_open_and_unknown_paths_need_admin() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access("/verdict.v1.Nope/Nothing"),
            Access::Needs {
                scope: Admin,
                rpc: ""
            }
        );
    }
}
