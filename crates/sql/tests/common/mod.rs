//! Helpers shared by the SQL layer's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use borealis_sql::{Database, ExecResult, Session};
use borealis_volume::{Volume, VolumeConfig};

/// A database over a fresh in-memory volume.
pub async fn db() -> Database {
    Database::open(Volume::in_memory(VolumeConfig::default()))
        .await
        .unwrap()
}

/// Runs `sql` and renders each result as text lines (or "ERROR <code>").
pub async fn run(s: &mut Session, sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in s.query(sql).await {
        match r {
            Ok(ExecResult::Rows { rows, .. }) => {
                for row in rows {
                    out.push(
                        row.iter()
                            .map(|d| d.to_text().unwrap_or_else(|| "NULL".into()))
                            .collect::<Vec<_>>()
                            .join("|"),
                    );
                }
            }
            Ok(ExecResult::Command { tag }) => out.push(tag),
            Ok(other) => out.push(format!("{other:?}")),
            Err(e) => out.push(format!("ERROR {}", e.code)),
        }
    }
    out
}
