//! Deterministic simulation of storage + volume under faults.
