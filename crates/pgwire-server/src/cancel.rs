//! Cancel requests: BackendKeyData (pid, secret) → the connection's cancel flag.
//!
//! A CancelRequest arrives on a new connection with the pid and secret the server
//! sent at startup. The registry sets that connection's flag; the connection checks
//! it while it streams results, and the flag is meant to be handed to the session
//! so the engine can stop a running statement with 57014 (see the crate report).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    sessions: Mutex<HashMap<i32, (i32, Arc<AtomicBool>)>>,
}

/// Removes the connection's entry when the connection ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub flag: Arc<AtomicBool>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.registry.sessions.lock() {
            map.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> CancelGuard {
        // Pids only need to be unique among live connections; start at 1000 so they
        // look like process ids and never collide with 0 ("no pid").
        let pid = 1000 + (self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff);
        // A random secret so a client cannot cancel another one's queries by guessing.
        let secret = RandomState::new().hash_one(pid) as i32;
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut map) = self.sessions.lock() {
            map.insert(pid, (secret, flag.clone()));
        }
        CancelGuard {
            registry: self.clone(),
            pid,
            secret,
            flag,
        }
    }

    /// Returns whether a live connection matched (and was flagged).
    pub fn cancel(&self, pid: i32, secret: i32) -> bool {
        let Ok(map) = self.sessions.lock() else {
            return false;
        };
        match map.get(&pid) {
            Some((s, flag)) if *s == secret => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_needs_the_right_secret_and_a_live_connection() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register();
        assert!(!reg.cancel(g.pid, g.secret.wrapping_add(1)));
        assert!(!g.flag.load(Ordering::SeqCst));
        assert!(reg.cancel(g.pid, g.secret));
        assert!(g.flag.load(Ordering::SeqCst));
        let (pid, secret) = (g.pid, g.secret);
        drop(g);
        assert!(!reg.cancel(pid, secret));
    }
}
