//! A ferry client inside your own program: it prints each change of its connection state,
//! adds a TCP tunnel at run time, shows where visitors reach it, then cancels it and stops.
//!
//! With no argument it starts a server on loopback in the same process, so it runs alone;
//! or give a server started with `cargo run --example embed_server`:
//!
//! ```text
//! cargo run --example embed_client -- tcp://127.0.0.1:7000
//! ```

use std::time::Duration;

use ferry::{Client, ClientConfig, RemoteAddr, Server, ServerConfig, ServiceConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (remote, server) = match std::env::args().nth(1) {
        Some(remote) => (RemoteAddr::parse(&remote)?, None),
        None => {
            let mut config = ServerConfig::default().with_user("demo", "demo-secret");
            config.addr = Some("127.0.0.1:0".parse()?);
            config.tcp_ranges = vec!["20000-20100".parse()?];
            let server = Server::bind(config).await?.spawn();
            (RemoteAddr::parse(&server.local_addr().to_string())?, Some(server))
        }
    };
    let config = ClientConfig::new(remote, "demo", "demo-secret");
    config.validate()?;
    let client = Client::connect(config).await?;

    // Every state change, as it happens: connecting, connected, disconnected, stopped.
    let mut state = client.state();
    let states = tokio::spawn(async move {
        loop {
            println!("client state: {}", *state.borrow_and_update());
            if state.changed().await.is_err() {
                return;
            }
        }
    });

    // A tunnel added at run time: the server picks a port; nothing needs to listen on the
    // local address until a visitor comes.
    let mut tunnel = client.add_service(ServiceConfig::tcp("127.0.0.1:8080")).await?;
    println!("visitors of {} reach 127.0.0.1:8080", tunnel.public_addr());
    tokio::time::sleep(Duration::from_millis(200)).await;
    tunnel.cancel();
    println!("tunnel closed: {:?}", tunnel.closed().await);

    client.shutdown().await;
    states.await?;
    if let Some(server) = server {
        server.shutdown().await;
    }
    Ok(())
}
