//! The command line: `ferry server`, `ferry client`, `ferry demo`.
//!
//! `ferry client` takes GT's positional style: each `--local` starts a new
//! service, and the service flags after it belong to that service. Client-wide flags
//! (`--log-level`, `--tag`, ...) may come anywhere, also after a `--local`. GT's
//! single-dash camelCase flags (`-remoteTCPPort 2222`) are taken too (see `config/gt.rs`).

use std::ffi::OsString;

use clap::{Command as ClapCommand, CommandFactory, Parser, Subcommand};

use crate::config::gt::normalise_args;
use crate::config::options::{ClientOptions, ServerOptions, ServiceOptions};

/// Reverse tunnels: expose services behind NAT through a public server.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// Parsed once at start-up; boxing the large variant would only complicate clap's derive.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the public server that clients connect to.
    Server(ServerOptions),
    /// Run a client that exposes local services through a server.
    #[command(after_long_help = service_help(), after_help = "Service flags follow each --local; see --help.")]
    Client(ClientOptions),
    /// Run a server, a client and a tiny web service on loopback, tunnelled, to try ferry out.
    Demo(DemoOptions),
}

/// Options of `ferry demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Log filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// Parses only the flags of one service segment (`--local ... --remote-tcp-port ...`).
#[derive(Debug, Parser)]
#[command(name = "service", no_binary_name = true, disable_help_flag = true)]
struct ServiceCli {
    #[command(flatten)]
    options: ServiceOptions,
}

fn service_help() -> String {
    let help = ServiceCli::command().render_long_help().to_string();
    let flags = help.split_once("Options:").map(|(_, flags)| flags).unwrap_or(&help);
    format!(
        "Services (repeat for each; in a config file, items of `services:` with the same keys):\n\
         Each --local starts a service; the flags below, after it, belong to that service.\n{flags}\n\
         Example:\n  ferry client --remote tcp://example.com:7000 --id id1 --secret s1 \\\n    \
         --local tcp://127.0.0.1:22 --remote-tcp-port 2222 \\\n    --local tcp://127.0.0.1:5432 --remote-tcp-random"
    )
}

/// Parses the process arguments, exiting with clap's message on error.
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
}

/// Parses arguments (the first is the program name).
pub fn parse_from(args: impl IntoIterator<Item = impl Into<OsString>>) -> Result<Cli, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let args = normalise_args(args, is_long_flag)
        .map_err(|e| clap::Error::raw(clap::error::ErrorKind::UnknownArgument, format!("{e}\n")))?;
    let (head, segments) = split_services(args);
    let mut cli = Cli::try_parse_from(head)?;
    if let Command::Client(options) = &mut cli.command {
        for segment in segments {
            options.services.push(ServiceCli::try_parse_from(segment)?.options);
        }
    }
    Ok(cli)
}

/// Whether some command (or a service) has the long flag `--name`.
fn is_long_flag(name: &str) -> bool {
    let cli = Cli::command();
    let service = ServiceCli::command();
    let commands = cli.get_subcommands().chain([&cli, &service]);
    let mut args = commands.flat_map(|command| command.get_arguments().collect::<Vec<_>>());
    ["help", "version"].contains(&name) || args.any(|arg| arg.get_long() == Some(name))
}

/// After `client`, cuts the arguments at each `--local`: the head, then one segment per
/// service. Client-wide flags found after a `--local` join the head.
fn split_services(args: Vec<OsString>) -> (Vec<OsString>, Vec<Vec<OsString>>) {
    let is_client =
        args.iter().skip(1).find(|a| !a.to_string_lossy().starts_with('-')).is_some_and(|a| a == "client");
    if !is_client {
        return (args, Vec::new());
    }
    let mut head = Vec::new();
    let mut segments: Vec<Vec<OsString>> = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if text == "--local" || text.starts_with("--local=") {
            segments.push(Vec::new());
        }
        match segments.last_mut() {
            Some(segment) => segment.push(arg),
            None => head.push(arg),
        }
    }
    let cli = Cli::command();
    let service = ServiceCli::command();
    if let Some(client) = cli.find_subcommand("client") {
        for segment in &mut segments {
            head.extend(take_client_flags(client, &service, segment));
        }
    }
    (head, segments)
}

/// Removes from `segment` the flags of `client` that are not flags of `service`, with
/// their values, and returns them. Values of the service's own flags are left alone,
/// even when they look like flags.
fn take_client_flags(
    client: &ClapCommand,
    service: &ClapCommand,
    segment: &mut Vec<OsString>,
) -> Vec<OsString> {
    let mut kept = Vec::with_capacity(segment.len());
    let mut taken = Vec::new();
    let mut args = std::mem::take(segment).into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let (to, value_follows) = match (flag_of(service, &text), flag_of(client, &text)) {
            (Some(value_follows), _) => (&mut kept, value_follows),
            (None, Some(value_follows)) => (&mut taken, value_follows),
            (None, None) => (&mut kept, false),
        };
        to.push(arg);
        if value_follows {
            to.extend(args.next());
        }
    }
    *segment = kept;
    taken
}

/// Whether `token` is a flag of `command` and, if so, whether its value is the next argument.
fn flag_of(command: &ClapCommand, token: &str) -> Option<bool> {
    let (name, inline_value) = match token.split_once('=') {
        Some((name, _)) => (name, true),
        None => (token, false),
    };
    let arg = if let Some(long) = name.strip_prefix("--") {
        command.get_arguments().find(|a| a.get_long() == Some(long))
    } else {
        let short = name.strip_prefix('-').filter(|s| s.chars().count() == 1)?;
        command.get_arguments().find(|a| a.get_short().is_some_and(|c| short.starts_with(c)))
    }?;
    Some(!inline_value && arg.get_action().takes_values() && !arg.is_require_equals_set())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_take_the_flags_that_follow_them() {
        let cli = parse_from([
            "ferry",
            "client",
            "--remote",
            "tcp://h:1",
            "--id",
            "a",
            "--secret",
            "s",
            "--local",
            "tcp://127.0.0.1:22",
            "--remote-tcp-port",
            "2222",
            "--local=127.0.0.1:80",
            "--remote-tcp-random",
            "--name",
            "web",
        ])
        .unwrap();
        let Command::Client(options) = cli.command else { panic!("not a client") };
        assert_eq!(options.services.len(), 2);
        assert_eq!(options.services[0].remote_tcp_port, Some(2222));
        assert_eq!(options.services[0].remote_tcp_random, None);
        assert_eq!(options.services[1].remote_tcp_random, Some(true));
        assert_eq!(options.services[1].name.as_deref(), Some("web"));
    }

    #[test]
    fn server_flags_pair_ids_and_secrets() {
        let cli = parse_from([
            "ferry",
            "server",
            "--id",
            "a",
            "--secret",
            "1",
            "--id",
            "b",
            "--secret",
            "2",
            "--allow-any-client",
        ])
        .unwrap();
        let Command::Server(options) = cli.command else { panic!("not a server") };
        let config = options.into_config().unwrap();
        assert_eq!(config.users.len(), 2);
        assert!(config.allow_any_client);
    }

    #[test]
    fn client_flags_after_a_local_apply_to_the_client() {
        let cli = parse_from([
            "ferry",
            "client",
            "--remote",
            "tcp://h:1",
            "--local",
            "127.0.0.1:22",
            "--log-level",
            "debug",
            "--message=--tag=no",
            "--tag=web",
            "--remote-cert-insecure",
            "--local",
            "127.0.0.1:80",
            "-s",
            "stop",
            "--name",
            "http",
        ])
        .unwrap();
        let Command::Client(options) = cli.command else { panic!("not a client") };
        assert_eq!(options.log_level.as_deref(), Some("debug"));
        assert_eq!(options.tag, ["web"]);
        assert_eq!(options.remote_cert_insecure, Some(true));
        assert!(options.signal.is_some());
        assert_eq!(options.services.len(), 2);
        assert_eq!(options.services[0].message.as_deref(), Some("--tag=no"), "a service's value stays");
        assert_eq!(options.services[1].name.as_deref(), Some("http"));
    }

    #[test]
    fn unknown_service_flag_is_an_error() {
        let err = parse_from(["ferry", "client", "--local", "127.0.0.1:1", "--bogus"]).unwrap_err();
        assert!(err.to_string().contains("--bogus"));
    }
}
