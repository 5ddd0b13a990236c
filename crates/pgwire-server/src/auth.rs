//! SCRAM-SHA-256 (RFC 5802/7677) on top of pgwire's SCRAM state machine.
//!
//! pgwire's `ScramAuth` startup handler is tied to its own connection loop, but
//! `ScramServerAuth` is a plain state machine over the SASL payloads, which is what
//! the front end drives here. The server keeps a verifier (StoredKey, ServerKey),
//! derived once from the configured password, like PostgreSQL's `pg_authid`.

use pgwire::api::auth::sasl::scram::{
    gen_salted_password, random_nonce, ScramSecret, ScramServerAuth, SCRAM_ITERATIONS,
};

pub const MECHANISM: &str = "SCRAM-SHA-256";

/// A SCRAM verifier: salt, iterations, StoredKey, ServerKey.
pub struct ScramCredential {
    salt: Vec<u8>,
    iterations: usize,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl ScramCredential {
    pub fn new(password: &str) -> ScramCredential {
        // Any bytes make a salt; the nonce generator is pgwire's CSPRNG-backed one.
        let salt = random_nonce().into_bytes();
        let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
        match ScramSecret::verifier_from_salted_password(salt.clone(), salted, SCRAM_ITERATIONS) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => ScramCredential {
                salt,
                iterations,
                stored_key,
                server_key,
            },
            // verifier_from_salted_password always returns a Verifier; keep a
            // credential nobody can match rather than panic if that ever changes.
            ScramSecret::SaltedPassword { .. } => ScramCredential {
                salt,
                iterations: SCRAM_ITERATIONS,
                stored_key: vec![],
                server_key: vec![],
            },
        }
    }

    pub fn secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

impl std::fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramCredential {{ iterations: {} }}", self.iterations)
    }
}

/// The server side of one exchange. Channel binding (-PLUS) is not offered.
pub fn server() -> ScramServerAuth {
    ScramServerAuth::new()
}
