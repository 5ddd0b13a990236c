//! Storage node: segment logs, group commit, gossip, page materialization, GC.
