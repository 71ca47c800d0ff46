//! `run`: the agent, its probes, metrics, signals and reloads.
use std::sync::Arc;

use qcom_reset::access;
use qcom_reset::agent::{Agent, Reloader, metrics::Metrics};
use qcom_reset::config::Config;
use qcom_reset::device::DEVICES;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::probes::{self, Tracer};
use tokio::sync::watch;

use super::check::{self, Level};
use super::cli::RunArgs;
use super::{config_default_path, kernel_release, require_root, sd_notify};

impl RunArgs {
    /// `run`'s flags over the file's values.
    fn apply_to(&self, cfg: &mut Config) {
        cfg.observe_only |= self.observe_only;
        if let Some(p) = self.metrics_port {
            cfg.metrics_port = p;
        }
        if let Some(j) = &self.journal {
            cfg.journal = j.clone();
        }
        if let Some(s) = &self.state_file {
            cfg.state_file = s.clone();
        }
        if let Some(k) = &self.kill_switch {
            cfg.kill_switch = k.clone();
        }
        if let Some(f) = self.flavour {
            cfg.flavour = f;
        }
        if let Some(x) = self.access {
            cfg.access = x;
        }
    }
}

/// The agent's configuration: the file, its drop-ins, then `run`'s flags (at a reload too).
fn agent_config(a: &RunArgs) -> anyhow::Result<Config> {
    let path = a.config.clone().unwrap_or_else(config_default_path);
    let mut cfg = Config::load(&path, a.config.is_some())?;
    a.apply_to(&mut cfg);
    Ok(cfg)
}

pub(super) fn run_cmd(host: Host, a: RunArgs) -> anyhow::Result<Exit> {
    let cfg = agent_config(&a)?;
    if a.check_config {
        let path = a.config.clone().unwrap_or_else(config_default_path);
        println!("{}: valid", path.display());
        return Ok(Exit::Ok);
    }
    require_root()?;
    let opts = probe_options(&host, &cfg)?;
    // One thread runs the event loop and every device's task; resets and checks block in the
    // blocking pool (threads that exit after 10 s idle), so an idle agent is one sleeping thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(old) = check::kernel_too_old(&kernel_release()) {
        eprintln!("qcom-reset: cannot start the agent: {}", old.line());
        return Ok(Exit::Unavailable);
    }
    rt.block_on(run_agent(host, a, cfg, opts))
}

/// The filter: the table's IDs plus those of devices given a profile in the configuration.
fn probe_options(host: &Host, cfg: &Config) -> anyhow::Result<probes::Options> {
    let mut targets: Vec<(u16, u16)> = DEVICES.iter().map(|d| (d.vendor, d.device)).collect();
    for (bdf, _, _) in cfg.overrides(&[]) {
        if let Ok(ids) = host.sysfs.device(bdf).and_then(|d| d.ids()) {
            targets.push(ids);
        }
    }
    targets.extend(cfg.rule_ids());
    Ok(probes::Options {
        trace_all: false,
        targets,
        ignore: Some(probes::loader::NsTgid::current()?),
        flavour: cfg.flavour,
    })
}

/// The probes, the agent and the signal handling, until a signal or the probes' failure.
async fn run_agent(
    host: Host,
    a: RunArgs,
    cfg: Config,
    opts: probes::Options,
) -> anyhow::Result<Exit> {
    let mut tracer = match Tracer::start(&opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("qcom-reset: cannot start the agent: {e:#}");
            for c in check::run(&host).iter().filter(|c| c.level == Level::Fail) {
                eprintln!("{}", c.line());
            }
            return Ok(Exit::Unavailable);
        }
    };
    let m = metrics(&cfg);
    let observe = cfg.observe_only;
    let access = cfg.access;
    let agent = Agent::new(
        cfg,
        host,
        Arc::new(move |d, own| access::open(d, access, own)),
        m,
    )?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let forward = async {
        let failed = qcom_reset::agent::forward(&mut tracer, tx, stop_rx.clone()).await;
        if failed {
            let _ = stop_tx.send(true);
        }
        failed
    };
    let signals = signals(&a, agent.reloader(), &stop_tx, stop_rx.clone());
    let mut stop = stop_rx.clone();
    tracing::info!(
        "agent running{}",
        if observe { " (observe-only)" } else { "" }
    );
    let ((), failed, ()) = tokio::join!(
        agent.run(rx, async move {
            let _ = stop.changed().await;
        }),
        forward,
        signals
    );
    Ok(if failed { Exit::Error } else { Exit::Ok })
}

/// The agent's metrics, served on their port when one is set.
fn metrics(cfg: &Config) -> Arc<Metrics> {
    let textfile =
        (!cfg.metrics_textfile.as_os_str().is_empty()).then(|| cfg.metrics_textfile.clone());
    let m = Arc::new(Metrics::new(textfile));
    if cfg.metrics_port != 0 {
        let addr = std::net::SocketAddr::new(cfg.metrics_listen, cfg.metrics_port);
        let listener = qcom_reset::agent::metrics::serve(m.clone(), addr);
        tokio::spawn(async move {
            if let Err(e) = listener.await {
                tracing::error!("metrics server: {e}");
            }
        });
    }
    m
}

/// SIGINT and SIGTERM stop the agent; SIGHUP (`systemctl reload`) re-reads the configuration
/// (its default action would end the agent, mid-reset perhaps). Ends early when the probes
/// failed.
async fn signals(
    a: &RunArgs,
    reloader: Reloader,
    stop_tx: &watch::Sender<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => reload(a, &reloader),
            _ = stopped.changed() => return,
        }
    }
    tracing::info!("signal received");
    sd_notify(sd_notify::NotifyState::Stopping);
    let _ = stop_tx.send(true);
}

/// A SIGHUP: the configuration read again and applied, or kept whole when the new one is bad
/// (a reload never stops the agent).
fn reload(a: &RunArgs, reloader: &Reloader) {
    reloader.reload(|| agent_config(a));
}
