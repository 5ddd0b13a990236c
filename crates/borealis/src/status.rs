//! Human output of `borealis status`: a compact table built from the same JSON
//! document that `status --json` prints, so the two never disagree.

use serde_json::Value;

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    }
}

pub fn table(status: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let list = |key: &str| {
        status
            .get(key)
            .and_then(|v| v.as_array())
            .unwrap_or(&empty)
            .clone()
    };
    let volume = status.get("volume").cloned().unwrap_or(Value::Null);
    out.push_str(&format!(
        "writer {}   volume epoch {}  vdl {}  pgs {}\n",
        s(status, "writer"),
        s(&volume, "epoch"),
        s(&volume, "vdl"),
        s(&volume, "protection_groups"),
    ));
    if let Some(e) = status.get("endpoints") {
        out.push_str(&format!(
            "endpoints: writer {}  reader {}  control {}\n",
            s(e, "writer"),
            s(e, "reader"),
            s(e, "control")
        ));
    }
    out.push_str(&format!(
        "\n{:<14} {:<9} {:<10} {:<5} {:<16} {:>8} {:>12} {:>10} {:>8} {:>8}\n",
        "NAME",
        "ROLE",
        "STATE",
        "AZ",
        "ADDR",
        "PID",
        "APPLIED_LSN",
        "VDL/SCL",
        "LAG_MS",
        "RESTARTS"
    ));
    let mut row = |n: &Value, role: String, applied: String, vdl: String, lag: String| {
        out.push_str(&format!(
            "{:<14} {:<9} {:<10} {:<5} {:<16} {:>8} {:>12} {:>10} {:>8} {:>8}\n",
            s(n, "name"),
            role,
            s(n, "state"),
            s(n, "az").replace("az-", ""),
            s(n, "addr"),
            s(n, "pid"),
            applied,
            vdl,
            lag,
            s(n, "restarts"),
        ));
    };
    for n in list("instances") {
        row(
            &n,
            s(&n, "role"),
            s(&n, "applied_lsn"),
            s(&n, "vdl"),
            s(&n, "lag_ms"),
        );
    }
    for n in list("storage_nodes") {
        row(&n, "storage".into(), "-".into(), s(&n, "scl"), "-".into());
    }
    for n in list("proxies") {
        row(
            &n,
            format!("{}-ep", s(&n, "role")),
            "-".into(),
            "-".into(),
            "-".into(),
        );
    }
    if let Some(r) = status
        .get("membership")
        .and_then(|m| m.get("replacement"))
        .filter(|r| !r.is_null())
    {
        out.push_str(&format!(
            "replacement: {} -> {} ({})\n",
            s(r, "old"),
            s(r, "new"),
            s(r, "state")
        ));
    }
    for note in list("notes") {
        if let Some(note) = note.as_str() {
            out.push_str(&format!("note: {note}\n"));
        }
    }
    out
}
