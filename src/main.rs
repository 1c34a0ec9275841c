//! The `ferry` binary: parse flags, run the command (`ferry::run`), report how it ended.

use std::process::ExitCode;

use ferry::cli::Command;

mod trim;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ferry::cli::parse();
    trim::spawn_trimmer();
    let result = match cli.command {
        Command::Server(flags) => ferry::run::server(flags).await,
        Command::Client(flags) => ferry::run::client(flags).await,
        Command::Demo(options) => ferry::run::demo(options).await,
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
