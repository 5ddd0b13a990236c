//! SQL: parse (sqlparser), bind, plan, execute against the engine.
