//! Endpoints: a TCP proxy that follows the current writer (later pooling, TLS).
