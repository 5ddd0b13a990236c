//! Control plane: metadata store, supervision, health, failover, HTTP JSON API.
