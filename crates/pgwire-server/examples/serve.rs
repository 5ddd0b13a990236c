//! A front end over an in-memory database, for trying clients by hand:
//! `cargo run -p borealis-pgwire-server --example serve -- 127.0.0.1:54329 [password]`.

use borealis_pgwire_server::{serve, Auth, ServerConfig};
use borealis_sql::Database;
use borealis_volume::{Volume, VolumeConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:54329".to_string());
    let password = args.next();
    let db = Database::open(Volume::in_memory(VolumeConfig::default())).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("listening on {addr}");
    let config = ServerConfig {
        auth: Auth::from_password(password.as_deref()),
        ..ServerConfig::default()
    };
    serve(listener, db, config).await?;
    Ok(())
}
