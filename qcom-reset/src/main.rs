mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    // Commands that write to a device finish their session (and its restore) before a
    // SIGINT/SIGTERM/SIGHUP takes effect; `run` and `trace` handle signals themselves.
    let writes = matches!(
        cli.command,
        cli::Command::Reset(_) | cli::Command::Status(_) | cli::Command::PowerCycle(_)
    );
    let (result, signal) = if writes {
        qcom_reset::signals::deferring(|| commands::run(cli))
    } else {
        (commands::run(cli), None)
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qcom-reset: {e:#}");
            ExitCode::from(1)
        }
    };
    match signal {
        Some(sig) => {
            eprintln!("qcom-reset: interrupted (signal {sig}); the device was restored first");
            ExitCode::from(128 + sig as u8)
        }
        None => code,
    }
}

/// journald when started by systemd (structured fields kept), stderr otherwise.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => registry.with(j).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}
