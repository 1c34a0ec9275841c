//! A ferry server inside your own program: one user, TCP tunnels on ports 20000-20100,
//! clients on 127.0.0.1:7000 (or the address given as the first argument). Stops on Ctrl-C.
//!
//! ```text
//! cargo run --example embed_server -- 127.0.0.1:7000
//! ferry client --remote tcp://127.0.0.1:7000 --id demo --secret demo-secret --local tcp://127.0.0.1:22
//! ```

use ferry::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7000".into());
    let mut config = ServerConfig::default().with_user("demo", "demo-secret");
    config.addr = Some(addr.parse()?);
    config.tcp_ranges = vec!["20000-20100".parse()?];
    // Checks the values a type cannot (TLS pairs, API token, ids...); errors name the key.
    config.validate()?;
    let server = Server::bind(config).await?;
    println!("clients connect to tcp://{}; Ctrl-C stops", server.local_addr());
    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
