//! What the `ferry` binary runs: the server, the client with its services, and the
//! demo, each until Ctrl-C or SIGTERM. `main.rs` only parses flags and reports errors.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::{anyhow, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::cli::DemoOptions;
use crate::config::options::{resolve, ClientOptions, CommandOptions, ServerOptions};
use crate::logging::{self, LogSettings};
use crate::pid_file::{signal_process, PidFile};
use crate::signals::{Hangups, Signals};
use crate::{Client, ClientState, ConfigError, Registration, Reloader, Server, ServerError, ServiceConfig};

/// Reads the flags and their config file. With `-s`, signals the running process and
/// returns `None`; otherwise sets up logs and returns the options and the pid file's path.
fn start<C: CommandOptions>(flags: &C) -> anyhow::Result<Option<(C, Option<PathBuf>)>> {
    let options = resolve(flags.clone(), flags.config_file())?;
    let process = options.process()?;
    if let Some(signal) = flags.signal() {
        let path =
            process.pid_file.ok_or_else(|| anyhow!("-s needs --pid-file (or pid-file in --config)"))?;
        let pid = signal_process(&path, signal)?;
        println!("sent {signal:?} to ferry {} {pid}", C::NAME);
        return Ok(None);
    }
    logging::init(&process.log, process.sentry.as_ref())?;
    Ok(Some((options, process.pid_file)))
}

/// Runs `ferry server` with `flags` (or signals the running one with `-s`).
pub async fn server(flags: ServerOptions) -> anyhow::Result<()> {
    let Some((options, pid_file)) = start(&flags)? else { return Ok(()) };
    let server = Server::bind(options.into_config()?).await?;
    let (hangups, shutdown) = Signals::install().split();
    let _pid_file = pid_file.as_deref().map(PidFile::create).transpose()?;
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
        let config = resolve(flags.clone(), flags.config_file()).and_then(|o| o.into_config());
        let result = config.map_err(ServerError::from).and_then(|c| reloader.reload(&c));
        if let Err(err) = result {
            tracing::error!("reload failed, keeping the running configuration: {err}");
        }
    }
}

/// Runs `ferry client` with `flags` (or signals the running one with `-s`).
pub async fn client(flags: ClientOptions) -> anyhow::Result<()> {
    let Some((mut options, pid_file)) = start(&flags)? else { return Ok(()) };
    let (mut hangups, shutdown) = Signals::install().split();
    let shutdown = shutdown.wait();
    tokio::pin!(shutdown);
    if options.remote.is_empty() {
        if let (Some(url), Some(id)) = (options.remote_api.clone(), options.id.clone()) {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                remotes = crate::client::ask_remote_api_until_answered(&url, &id) => {
                    options.remote = remotes.iter().map(ToString::to_string).collect();
                }
            }
        }
    }
    let (config, services) = options.into_config()?;
    let forwards = config.forwards.clone();
    if services.is_empty() && forwards.is_empty() {
        tracing::warn!("no services given (--local); the client only keeps its connection");
    }
    let remote = config.remote.to_string();
    // Started before its server (systemd, containers), the client waits for it.
    let client = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        client = Client::connect_retrying(config) => client.with_context(|| format!("client for {remote}"))?,
    };
    let mut _forwards = Vec::new();
    for forward in forwards {
        _forwards.push(client.forward(forward).await?);
    }
    let _pid_file = pid_file.as_deref().map(PidFile::create).transpose()?;
    let mut running = Services {
        client: &client,
        listed: services.clone(),
        open: Vec::new(),
        opening: Vec::new(),
        answers: FuturesUnordered::new(),
    };
    for service in services {
        running.open(service, true);
    }
    let mut state = client.state();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some((service, at_start, opened)) = running.answers.next() => running.opened(service, at_start, opened)?,
            _ = hangups.next() => {
                tracing::info!("SIGHUP: reloading the services");
                if let Err(err) = running.reload(&flags) {
                    tracing::error!("reload failed, keeping the running services: {err}");
                }
            }
            failed = state.wait_for(|s| matches!(s, ClientState::Failed { .. })) => {
                let reason = match failed.as_deref() {
                    Ok(ClientState::Failed { reason }) => reason.clone(),
                    _ => "stopped".into(),
                };
                return Err(anyhow!("client for {remote}: {reason}"));
            }
        }
    }
    drop(running);
    client.shutdown().await;
    Ok(())
}

/// A service being opened: its config, whether it was given at start, and the answer.
type Opening<'a> = Pin<Box<dyn Future<Output = (ServiceConfig, bool, OpenResult)> + 'a>>;
type OpenResult = Result<Registration, crate::ClientError>;

/// The CLI client's services: open ones, and ones the server has not opened yet (a
/// refusal that may pass is asked again with backoff, while the others keep running).
struct Services<'a> {
    client: &'a Client,
    /// The services of the configuration, as last read.
    listed: Vec<ServiceConfig>,
    open: Vec<(ServiceConfig, Registration)>,
    /// Services waiting for the server to open them.
    opening: Vec<ServiceConfig>,
    answers: FuturesUnordered<Opening<'a>>,
}

impl<'a> Services<'a> {
    /// Starts opening `service`; `at_start` services end the client on a lasting refusal.
    fn open(&mut self, service: ServiceConfig, at_start: bool) {
        let client = self.client;
        self.opening.push(service.clone());
        self.answers.push(Box::pin(async move {
            let opened = client.add_service_retrying(service.clone()).await;
            (service, at_start, opened)
        }));
    }

    /// Takes the server's answer for a service; a lasting refusal of one given at start
    /// ends the client, as a bad flag would.
    fn opened(&mut self, service: ServiceConfig, at_start: bool, opened: OpenResult) -> anyhow::Result<()> {
        let local = service.local.clone();
        if let Some(at) = self.opening.iter().position(|s| *s == service) {
            self.opening.swap_remove(at);
        }
        match opened {
            // Removed by a reload while it was being opened.
            Ok(tunnel) if !self.listed.contains(&service) => tunnel.cancel(),
            Ok(tunnel) => {
                announce(&local, &tunnel);
                self.open.push((service, tunnel));
            }
            // The client stopped: its state says why, and the loop ends with it.
            Err(crate::ClientError::Stopped) => {}
            Err(err) if at_start => return Err(err).with_context(|| format!("service {local}")),
            Err(err) => tracing::error!(%local, %err, "service added by reload was refused"),
        }
        Ok(())
    }

    /// Reads the client's configuration again: services no longer listed are closed, new
    /// ones opened, the rest keep running (server, id and secret need a restart).
    fn reload(&mut self, flags: &ClientOptions) -> Result<(), ConfigError> {
        let options = resolve(flags.clone(), flags.config_file())?;
        let (_, wanted) = options.into_config()?;
        self.listed = wanted.clone();
        self.open.retain(|(config, tunnel)| {
            let keep = wanted.contains(config);
            if !keep {
                tracing::info!(local = %config.local, "service removed by reload");
                tunnel.cancel();
            }
            keep
        });
        for service in wanted {
            if !self.open.iter().any(|(config, _)| *config == service) && !self.opening.contains(&service) {
                self.open(service, false);
            }
        }
        Ok(())
    }
}

/// Prints where a service is reachable, and again after each reconnect.
fn announce(local: &str, tunnel: &Registration) {
    let (local, mut public) = (local.to_owned(), tunnel.watch_public_addr());
    tokio::spawn(async move {
        loop {
            if let Some(addr) = public.borrow_and_update().clone() {
                println!("{local} is reachable at {addr}");
            }
            if public.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Runs `ferry demo`.
pub async fn demo(options: DemoOptions) -> anyhow::Result<()> {
    logging::init(&LogSettings { level: options.log_level, ..LogSettings::default() }, None)?;
    crate::demo::run(Signals::install().split().1.wait()).await.map_err(|e| anyhow!(e))
}
