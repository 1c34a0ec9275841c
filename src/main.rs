//! The `ferry` binary: parse flags, set up logs, run until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use anyhow::{anyhow, Context};
use ferry::cli::{Command, DemoOptions};
use ferry::config::options::{resolve, ClientOptions, ServerOptions};
use ferry::logging::{self, LogSettings};
use ferry::pid_file::{signal_process, PidFile};
use ferry::signals::{Hangups, Signals};
use ferry::{Client, Registration, Reloader, Server, ServiceConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ferry::cli::parse();
    let result = match cli.command {
        Command::Server(flags) => run_server(flags).await,
        Command::Client(flags) => run_client(flags).await,
        Command::Demo(options) => run_demo(options).await,
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    };
    // Whatever is queued for Sentry goes out before the process ends.
    ferry::error_reporting::flush(std::time::Duration::from_secs(2));
    code
}

async fn run_server(flags: ServerOptions) -> anyhow::Result<()> {
    let config_file = flags.config.clone();
    let signal = flags.signal;
    let options = resolve(flags.clone(), config_file.as_deref()).map_err(|e| anyhow!(e))?;
    if let Some(signal) = signal {
        let path = options
            .pid_file
            .clone()
            .ok_or_else(|| anyhow!("-s needs --pid-file (or pid-file in --config)"))?;
        let pid = signal_process(&path, signal).map_err(|e| anyhow!(e))?;
        println!("sent {signal:?} to ferry server {pid}");
        return Ok(());
    }
    let sentry = options.sentry_settings().map_err(|e| anyhow!(e))?;
    logging::init(&options.log_settings(), sentry.as_ref()).map_err(|e| anyhow!(e))?;
    let pid_file = options.pid_file.clone();
    let config = options.into_config().map_err(|e| anyhow!(e))?;
    let server = Server::bind(config).await?;
    let (hangups, shutdown) = Signals::install().split();
    let _pid_file = pid_file.as_deref().map(PidFile::create).transpose().map_err(|e| anyhow!(e))?;
    tokio::spawn(reload_on_hangup(server.reloader(), flags, hangups));
    // Run on a worker thread: accepting on the main thread would hand every connection across threads.
    tokio::spawn(server.run(shutdown.wait())).await?;
    Ok(())
}

/// On each SIGHUP, reads the flags' config and users files again and reloads the users.
async fn reload_on_hangup(reloader: Reloader, flags: ServerOptions, mut hangups: Hangups) {
    loop {
        hangups.next().await;
        tracing::info!("SIGHUP: reloading");
        let config_file = flags.config.clone();
        let config = resolve(flags.clone(), config_file.as_deref()).and_then(|o| o.into_config());
        let result = config.and_then(|c| reloader.reload(&c).map_err(|e| e.to_string()));
        if let Err(err) = result {
            tracing::error!("reload failed, keeping the running configuration: {err}");
        }
    }
}

async fn run_client(flags: ClientOptions) -> anyhow::Result<()> {
    let config_file = flags.config.clone();
    let signal = flags.signal;
    let options = resolve(flags.clone(), config_file.as_deref()).map_err(|e| anyhow!(e))?;
    if let Some(signal) = signal {
        let path = options
            .pid_file
            .clone()
            .ok_or_else(|| anyhow!("-s needs --pid-file (or pid-file in --config)"))?;
        let pid = signal_process(&path, signal).map_err(|e| anyhow!(e))?;
        println!("sent {signal:?} to ferry client {pid}");
        return Ok(());
    }
    let sentry = options.sentry_settings().map_err(|e| anyhow!(e))?;
    logging::init(&options.log_settings(), sentry.as_ref()).map_err(|e| anyhow!(e))?;
    let pid_file = options.pid_file.clone();
    let (config, services) = options.into_config().map_err(|e| anyhow!(e))?;
    if services.is_empty() {
        tracing::warn!("no services given (--local); the client only keeps its connection");
    }
    let remote = config.remote.to_string();
    let (mut hangups, shutdown) = Signals::install().split();
    let client = Client::connect(config).await.with_context(|| format!("client for {remote}"))?;
    let _pid_file = pid_file.as_deref().map(PidFile::create).transpose().map_err(|e| anyhow!(e))?;
    let mut tunnels = Vec::new();
    for service in services {
        let local = service.local.clone();
        let tunnel = client.add_service(service.clone()).await.with_context(|| format!("service {local}"))?;
        println!("{local} is reachable at {}", tunnel.public_addr());
        tunnels.push((service, tunnel));
    }
    let shutdown = shutdown.wait();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.next() => {
                tracing::info!("SIGHUP: reloading the services");
                if let Err(err) = reload_services(&client, &flags, &mut tunnels).await {
                    tracing::error!("reload failed, keeping the running services: {err}");
                }
            }
        }
    }
    client.shutdown().await;
    Ok(())
}

/// Reads the client's configuration again: services no longer listed are closed, new ones
/// opened, the rest keep running (server, id and secret need a restart).
async fn reload_services(
    client: &Client,
    flags: &ClientOptions,
    tunnels: &mut Vec<(ServiceConfig, Registration)>,
) -> Result<(), String> {
    let options = resolve(flags.clone(), flags.config.as_deref())?;
    let (_, wanted) = options.into_config()?;
    tunnels.retain(|(config, tunnel)| {
        let keep = wanted.contains(config);
        if !keep {
            tracing::info!(local = %config.local, "service removed by reload");
            tunnel.cancel();
        }
        keep
    });
    for service in wanted {
        if tunnels.iter().any(|(config, _)| *config == service) {
            continue;
        }
        let local = service.local.clone();
        match client.add_service(service.clone()).await {
            Ok(tunnel) => {
                println!("{local} is reachable at {}", tunnel.public_addr());
                tunnels.push((service, tunnel));
            }
            Err(err) => tracing::error!(%local, %err, "service added by reload was refused"),
        }
    }
    Ok(())
}

async fn run_demo(options: DemoOptions) -> anyhow::Result<()> {
    logging::init(&LogSettings { level: options.log_level, ..LogSettings::default() }, None)
        .map_err(|e| anyhow!(e))?;
    ferry::demo::run(Signals::install().split().1.wait()).await.map_err(|e| anyhow!(e))
}
