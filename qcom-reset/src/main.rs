mod cmd;

use std::process::ExitCode;

use clap::Parser;
use qcom_reset::exit::Exit;

fn main() -> ExitCode {
    let cli = cmd::cli::Cli::parse();
    let json = cli.command.json();
    init_logging();
    // Commands that write to a device finish their session (and its restore) before a
    // SIGINT/SIGTERM/SIGHUP takes effect; `run` and `trace` handle signals themselves.
    let writes = matches!(
        cli.command,
        cmd::cli::Command::Reset(_)
            | cmd::cli::Command::Status(_)
            | cmd::cli::Command::PowerCycle(_)
    );
    let (result, signal) = if writes {
        qcom_reset::signals::deferring(|| cmd::run(cli))
    } else {
        (cmd::run(cli), None)
    };
    let code = match result {
        Ok(exit) => exit,
        Err(e) => {
            let exit = classify(&e);
            if json {
                let err = serde_json::json!({
                    "error": format!("{e:#}"), "exit": exit.code(), "kind": exit.name()
                });
                println!("{err}");
            }
            eprintln!("qcom-reset: {e:#}");
            exit
        }
    };
    match signal {
        Some(sig) => {
            eprintln!("qcom-reset: interrupted (signal {sig}); the device was restored first");
            ExitCode::from(128 + sig as u8)
        }
        None => ExitCode::from(code.code()),
    }
}

/// The exit status of a command that failed: its library error's, else a generic error.
fn classify(e: &anyhow::Error) -> Exit {
    if let Some(e) = e.downcast_ref::<qcom_reset::Error>() {
        Exit::of(e)
    } else if e
        .downcast_ref::<qcom_reset::config::ConfigError>()
        .is_some()
    {
        Exit::Config
    } else {
        Exit::Error
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
