//! PostgreSQL wire protocol front end mapping to engine sessions.
