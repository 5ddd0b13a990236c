//! Control plane: metadata store, supervision, health, failover, HTTP JSON API.
//!
//! `borealis up` runs the control plane in its own process ([`up::run_up`]): it
//! owns the cluster metadata ([`metadata`]), supervises every node as a child
//! process ([`supervisor`]) and serves the JSON API the CLI, the proxies and the
//! instances use ([`api`]). The CLI's side of that API is [`client`].

pub mod api;
pub mod client;
pub mod datadir;
pub mod metadata;
pub mod repair;
pub mod supervisor;
pub mod up;
