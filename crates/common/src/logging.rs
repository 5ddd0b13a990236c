//! Structured logs: one line per event, `ts=... level=... target=... msg="..."`,
//! appended to a file per process in the data dir (or stderr when no file is given).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    process: String,
    out: Mutex<Option<File>>,
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let msg = record
            .args()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let line = format!(
            "ts={ts:.6} level={} process={} target={} msg=\"{msg}\"\n",
            record.level().as_str().to_lowercase(),
            self.process,
            record.target()
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match out.as_mut() {
            Some(file) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => eprint!("{line}"),
        }
    }

    fn flush(&self) {
        if let Some(file) = self.out.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = file.flush();
        }
    }
}

/// Installs the process-wide logger. `BOREALIS_LOG` (error|warn|info|debug|trace)
/// sets the level; info by default. Safe to call more than once (later calls no-op).
pub fn init(process: &str, file: Option<&Path>) -> std::io::Result<()> {
    let out = match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            Some(OpenOptions::new().create(true).append(true).open(path)?)
        }
        None => None,
    };
    let level = std::env::var("BOREALIS_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = Logger {
        process: process.to_string(),
        out: Mutex::new(out),
        level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}
