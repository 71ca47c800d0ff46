//! The binary: what each subcommand does with its arguments and how it prints; the preflight
//! checks; the man pages and completions.
pub mod check;
pub mod cli;
mod man;
use std::time::Duration;

use anyhow::Context as _;
use qcom_reset::access;
use qcom_reset::config::Config;
use qcom_reset::device::verdict::Health;
use qcom_reset::device::{DEVICES, OptIn};
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::host::sysfs::PciSysfs;
use qcom_reset::probes::{self, Item, Tracer};
use qcom_reset::session::{self, Method, Report, Request, Status};
use qcom_reset::{Error, device::regs};

use check::Level;
use cli::{
    Cli, Command, HealthArgs, HostArgs, PowerCycleArgs, ResetArgs, RunArgs, StatusArgs, TraceArgs,
};

pub fn host(a: &HostArgs) -> Host {
    Host {
        sysfs: PciSysfs {
            root: a.sysfs_root.clone(),
        },
        dev_vfio: a.dev_vfio.clone(),
        proc_root: a.proc_root.clone(),
        run_dir: a.run_dir.clone(),
        lock_wait: Duration::from_secs(30),
        open_group: Default::default(),
    }
}

fn require_root() -> Result<(), Error> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    let host = host(&cli.host);
    match cli.command {
        Command::Check { json } => check_cmd(&host, json),
        Command::Trace(a) => trace_cmd(&host, a),
        Command::Reset(a) => reset_cmd(&host, a),
        Command::Status(a) => status_cmd(&host, a),
        Command::Health(a) => health_cmd(&host, a),
        Command::Run(a) => run_cmd(host, a),
        Command::PowerCycle(a) => power_cycle_cmd(&host, a),
        Command::GenerateAssets { dir } => generate_assets(&dir),
    }
}

fn check_cmd(host: &Host, json: bool) -> anyhow::Result<Exit> {
    let checks = check::run(host);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
    }
    let ok = check::tracing_possible(&checks);
    if !json {
        println!(
            "{}",
            if ok {
                "tracing can work on this host"
            } else {
                "tracing cannot work on this host (see FAIL lines)"
            }
        );
    }
    Ok(if ok { Exit::Ok } else { Exit::Unavailable })
}

fn trace_cmd(host: &Host, a: TraceArgs) -> anyhow::Result<Exit> {
    let opts = probes::Options {
        trace_all: a.all,
        targets: DEVICES.iter().map(|d| (d.vendor, d.device)).collect(),
        ignore: Some(probes::loader::NsTgid::current()?),
        flavour: a.flavour,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(old) = check::kernel_too_old(&kernel_release()) {
        eprintln!("qcom-reset: cannot trace: {}", old.line());
        return Ok(Exit::Unavailable);
    }
    rt.block_on(async {
        let mut tracer = match Tracer::start(&opts) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("qcom-reset: cannot trace: {e:#}");
                for c in check::run(host).iter().filter(|c| c.level == Level::Fail) {
                    eprintln!("{}", c.line());
                }
                return Ok(Exit::Unavailable);
            }
        };
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                item = tracer.next() => print_item(&item?, a.json)?,
            }
        }
        Ok(Exit::Ok)
    })
}

fn print_item(item: &Item, json: bool) -> anyhow::Result<()> {
    match (item, json) {
        (Item::Event { event, .. }, true) => println!("{}", serde_json::to_string(event)?),
        (Item::Event { event, .. }, false) => println!("{}", event.line()),
        (Item::Attached(a), true) => println!(
            "{}",
            serde_json::json!({"kind": "attach", "attachments": a})
        ),
        (Item::Attached(a), false) => {
            for x in a {
                match x.flavour {
                    Some(f) => println!(
                        "attach  {:<30} {}{}",
                        x.function.symbol(),
                        qcom_reset::probes::events::flavour_str(f),
                        x.note
                            .as_ref()
                            .map(|n| format!(" (after {n})"))
                            .unwrap_or_default()
                    ),
                    None => println!(
                        "attach  {:<30} NOT ATTACHED: {}",
                        x.function.symbol(),
                        x.note.as_deref().unwrap_or("?")
                    ),
                }
            }
        }
        (Item::Drops { ringbuf, brackets }, true) => println!(
            "{}",
            serde_json::json!({"kind": "drops", "ringbuf": ringbuf, "brackets": brackets})
        ),
        (Item::Drops { ringbuf, brackets }, false) => {
            println!(
                "drops   ring buffer {ringbuf}, in-flight tables {brackets} (events were lost)"
            )
        }
        (Item::Bad(why), true) => println!(
            "{}",
            serde_json::json!({"kind": "bad-record", "error": why})
        ),
        (Item::Bad(why), false) => println!("bad     {why}"),
        (Item::Bound(bdf), true) => println!(
            "{}",
            serde_json::json!({"kind": "bind", "bdf": bdf.to_string(), "driver": "vfio-pci"})
        ),
        (Item::Bound(bdf), false) => println!("bind    {bdf} vfio-pci"),
        (Item::UeventsLost, true) => println!("{}", serde_json::json!({"kind": "uevents-lost"})),
        (Item::UeventsLost, false) => println!("lost    kernel uevents (socket overflow)"),
    }
    Ok(())
}

fn reset_cmd(host: &Host, a: ResetArgs) -> anyhow::Result<Exit> {
    let cfg = device_config(a.device.config.clone())?;
    let ids = host.sysfs.device(a.bdf).and_then(|d| d.ids()).ok();
    let by_config = cfg.device_with_ids(a.bdf, ids);
    let req = Request {
        bdf: a.bdf,
        profile: a.device.profile.clone().or(by_config.profile),
        bar: a.device.bar.or(by_config.bar),
        force: a.force,
        dry_run: a.dry_run,
        ignore_kernel_reset: a.ignore_kernel_reset,
        experimental: opt_in(&cfg, a.experimental),
        allow_dpc: a.allow_dpc || cfg.allow_dpc,
        allow_unguarded_link_drop: a.allow_unguarded_link_drop || cfg.allow_unguarded_link_drop,
    };
    // Refuse a missing or non-target device before asking for root: that answer is more useful.
    match session::inspect(host, req.bdf, req.profile.as_deref(), req.bar) {
        Err(e @ Error::NotTarget { .. }) if a.only_targets => {
            nothing_to_do(req.bdf, &format!("not a target ({e})"), a.json);
            return Ok(Exit::Ok);
        }
        Err(e) => return Err(e.into()),
        Ok(t) if req.profile.is_none() && !req.experimental.allows(&t.profile) => {
            if a.only_targets {
                let why = format!("experimental profile {} not opted in", t.profile.name);
                nothing_to_do(req.bdf, &why, a.json);
                return Ok(Exit::Ok);
            }
        }
        Ok(_) => {}
    }
    if !a.dry_run {
        require_root()?;
    }
    reset_and_report(host, &req, a.device.access, a.json)
}

/// `--only-targets` on a device qcom-reset does not act on: said on stdout, JSON with `--json`.
fn nothing_to_do(bdf: qcom_reset::bdf::Bdf, why: &str, json: bool) {
    if json {
        let out = serde_json::json!({"bdf": bdf, "nothing_to_do": why});
        println!("{out}");
    } else {
        println!("{bdf}: {why}; nothing to do");
    }
}

/// Runs the reset, prints its report; exit 0 when clean (or a dry run), 3 when not.
fn reset_and_report(
    host: &Host,
    req: &Request,
    access: access::Access,
    json: bool,
) -> anyhow::Result<Exit> {
    let report = session::reset(
        host,
        req,
        &mut |dev, own| access::open(dev, access, own),
        access.name(),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(match &report.verdict {
        Some(v) if v.health != Health::Clean => Exit::NotClean,
        _ => Exit::Ok,
    })
}

fn print_report(r: &Report) {
    if r.method == Method::DryRun {
        println!(
            "dry run: {} as {} ({}), sequence {}; nothing will be touched",
            r.bdf,
            r.profile,
            r.family.name(),
            r.sequence_version
        );
        for (i, p) in r.plan.iter().enumerate() {
            println!("  {:>2}. {p}", i + 1);
        }
        return;
    }
    let how = match r.method {
        Method::KernelDeviceSpecific => "the kernel's device_specific reset".to_string(),
        _ => format!("register sequence {} via {}", r.sequence_version, r.access),
    };
    println!(
        "{} {}: reset with {how} in {} ms",
        r.bdf, r.profile, r.duration_ms
    );
    if let Some(o) = &r.outcome {
        println!("  sequence: {o:?}, {} register operations", r.ops.len());
    }
    if let Some(v) = &r.verdict {
        println!("  verdict: {} ({})", v.health, v.detail);
        println!("  clean means: {}", v.expected);
        println!("  registers: {}", registers_line(&v.registers));
    }
    let rs = &r.restored;
    println!(
        "  restored: PCI_COMMAND={} power/control={}{}",
        rs.command
            .map_or("unchanged".into(), |c| format!("{c:#06x}")),
        rs.power_control.as_deref().unwrap_or("unchanged"),
        if rs.errors.is_empty() {
            String::new()
        } else {
            format!(" ERRORS: {}", rs.errors.join("; "))
        }
    );
}

fn registers_line(r: &qcom_reset::device::verdict::Registers) -> String {
    let h = |v: Option<u32>| v.map_or("-".to_string(), |v| format!("{v:#010x}"));
    let mut s = format!(
        "config {:04x}:{:04x} MHICTRL={} MHISTATUS={} BHIOFF={} EXECENV={}",
        r.config_vendor,
        r.config_device,
        h(r.mhictrl),
        h(r.mhistatus),
        h(r.bhioff),
        h(r.execenv)
    );
    if let Some(st) = r.mhistatus.filter(|s| *s != regs::ALL_ONES) {
        s.push_str(&format!(
            " (MHI {})",
            regs::mhi_state_name(regs::mhi_state(st))
        ));
    }
    s
}

fn status_cmd(host: &Host, a: StatusArgs) -> anyhow::Result<Exit> {
    let cfg = device_config(a.device.config.clone())?;
    let targets = match a.bdf {
        Some(b) => {
            let ids = host.sysfs.device(b).and_then(|d| d.ids()).ok();
            let by_config = cfg.device_with_ids(b, ids);
            vec![session::inspect(
                host,
                b,
                a.device.profile.as_deref().or(by_config.profile.as_deref()),
                a.device.bar.or(by_config.bar),
            )?]
        }
        None => session::targets(host, &cfg.overrides(&host.sysfs.present_ids()))?,
    };
    require_root()?;
    let access = a.device.access;
    let mut out: Vec<Status> = Vec::new();
    let unread = (access::opens_device(access) && !a.registers).then(|| {
        format!(
            "{}; pass --registers to read them anyway",
            access::VFIO_OPEN_RESETS
        )
    });
    for t in targets {
        let bdf = t.bdf;
        if let Some(why) = &unread {
            out.push(session::unread_status(
                t,
                session::Unread::Refused(why.clone()),
            ));
            continue;
        }
        out.push(
            session::status(
                host,
                t,
                &mut |dev, own| access::open(dev, access, own),
                session::ReadMode::EnableAndRestore,
            )
            .with_context(|| format!("status of {bdf}"))?,
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Exit::Ok);
    }
    if out.is_empty() {
        println!(
            "no target devices present (supported: {})",
            qcom_reset::device::profile_names()
        );
    }
    for s in &out {
        let t = &s.target;
        let holders: Vec<String> = t.holders.iter().map(|h| h.to_string()).collect();
        println!(
            "{} {} ({:04x}:{:04x}, {})",
            t.bdf, t.profile.name, t.vendor, t.device, t.profile.model
        );
        let named = a.device.profile.is_some()
            || cfg
                .device_with_ids(t.bdf, Some((t.vendor, t.device)))
                .profile
                .is_some();
        println!(
            "  profile: {}",
            profile_status(&t.profile, &cfg.experimental, named)
        );
        match session::upstream_port(t) {
            Ok(p) => println!("  port: {}", p.summary()),
            Err(e) => println!("  port: unreadable ({e})"),
        }
        println!(
            "  driver: {}  iommu_group: {}  holder: {}",
            t.driver.as_deref().unwrap_or("none"),
            t.iommu_group.as_deref().unwrap_or("none"),
            if holders.is_empty() {
                "none".into()
            } else {
                holders.join(", ")
            }
        );
        println!(
            "  power: {} (control {})  reset_method: {}{}",
            t.power_state.as_deref().unwrap_or("?"),
            t.power_control.as_deref().unwrap_or("?"),
            t.reset_methods
                .as_ref()
                .map_or("none".into(), |m| m.join(" ")),
            if s.kernel_device_specific {
                " (kernel has device_specific)"
            } else {
                ""
            }
        );
        println!("  regime: {}: {}", s.regime, s.regime.meaning());
        match (&s.verdict, &s.skipped) {
            (Some(v), _) => {
                println!("  verdict: {} ({})", v.health, v.detail);
                println!("  registers: {}", registers_line(&v.registers));
            }
            (None, Some(why)) => println!("  registers not read: {why}"),
            (None, None) => {}
        }
    }
    Ok(Exit::Ok)
}

/// Read-only: the agent's published status and sysfs, never a lock, a group or a write.
fn health_cmd(host: &Host, a: HealthArgs) -> anyhow::Result<Exit> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let answer = device_config(None)
        .and_then(|cfg| Ok(qcom_reset::health::assess(host, &cfg, &a.bdf, now)?));
    let answer = match answer {
        Ok(answer) => answer,
        // NPD's contract: a health that cannot be read is "unknown" (2), with one line.
        Err(e) => {
            if a.json {
                let err = serde_json::json!({"condition": "unknown", "error": format!("{e:#}")});
                println!("{err}");
            } else {
                println!("UNKNOWN: {e:#}");
            }
            return Ok(Exit::Health(qcom_reset::exit::Condition::Unknown));
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", answer.line());
    }
    Ok(Exit::Health(answer.condition))
}

/// The agent's configuration: the file, its drop-ins, then `run`'s flags (at a reload too).
fn agent_config(a: &RunArgs) -> anyhow::Result<Config> {
    let path = a.config.clone().unwrap_or_else(config_default_path);
    let mut cfg = Config::load(&path, a.config.is_some())?;
    cfg.observe_only |= a.observe_only;
    if let Some(p) = a.metrics_port {
        cfg.metrics_port = p;
    }
    if let Some(j) = &a.journal {
        cfg.journal = j.clone();
    }
    if let Some(s) = &a.state_file {
        cfg.state_file = s.clone();
    }
    if let Some(k) = &a.kill_switch {
        cfg.kill_switch = k.clone();
    }
    if let Some(f) = a.flavour {
        cfg.flavour = f;
    }
    if let Some(x) = a.access {
        cfg.access = x;
    }
    Ok(cfg)
}

fn run_cmd(host: Host, a: RunArgs) -> anyhow::Result<Exit> {
    use qcom_reset::agent::{Agent, metrics};
    let cfg = agent_config(&a)?;
    if a.check_config {
        let path = a.config.clone().unwrap_or_else(config_default_path);
        println!("{}: valid", path.display());
        return Ok(Exit::Ok);
    }
    require_root()?;
    // The filter: the table's IDs plus those of devices given a profile in the configuration.
    let mut targets: Vec<(u16, u16)> = DEVICES.iter().map(|d| (d.vendor, d.device)).collect();
    for (bdf, _, _) in cfg.overrides(&[]) {
        if let Ok(ids) = host.sysfs.device(bdf).and_then(|d| d.ids()) {
            targets.push(ids);
        }
    }
    targets.extend(cfg.rule_ids());
    let opts = probes::Options {
        trace_all: false,
        targets,
        ignore: Some(probes::loader::NsTgid::current()?),
        flavour: cfg.flavour,
    };
    let access = cfg.access;
    // One thread runs the event loop and every device's task; resets and checks block in the
    // blocking pool (threads that exit after 10 s idle), so an idle agent is one sleeping thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(old) = check::kernel_too_old(&kernel_release()) {
        eprintln!("qcom-reset: cannot start the agent: {}", old.line());
        return Ok(Exit::Unavailable);
    }
    rt.block_on(async move {
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
        let textfile =
            (!cfg.metrics_textfile.as_os_str().is_empty()).then(|| cfg.metrics_textfile.clone());
        let m = std::sync::Arc::new(metrics::Metrics::new(textfile));
        if cfg.metrics_port != 0 {
            let addr = std::net::SocketAddr::new(cfg.metrics_listen, cfg.metrics_port);
            let listener = metrics::serve(m.clone(), addr);
            tokio::spawn(async move {
                if let Err(e) = listener.await {
                    tracing::error!("metrics server: {e}");
                }
            });
        }
        let observe = cfg.observe_only;
        let agent = Agent::new(
            cfg,
            host,
            std::sync::Arc::new(move |d, own| access::open(d, access, own)),
            m,
        )?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let forward = async {
            let failed = qcom_reset::agent::forward(&mut tracer, tx, stop_rx.clone()).await;
            if failed {
                let _ = stop_tx.send(true);
            }
            failed
        };
        let reloader = agent.reloader();
        let signals = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            // SIGHUP (`systemctl reload`) re-reads the configuration; its default action would
            // end the agent, mid-reset perhaps.
            let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
            let mut stopped = stop_rx.clone();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => reload(&a, &reloader),
                    _ = stopped.changed() => return,
                }
            }
            tracing::info!("signal received");
            sd_notify(sd_notify::NotifyState::Stopping);
            let _ = stop_tx.send(true);
        };
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
    })
}

/// A SIGHUP: the configuration read again and applied, or kept whole when the new one is bad
/// (a reload never stops the agent).
fn reload(a: &RunArgs, reloader: &qcom_reset::agent::Reloader) {
    reloader.reload(|| agent_config(a));
}

/// Man pages (clap_mangen: qcom-reset.8 and qcom-reset-SUBCOMMAND.8) and bash/zsh/fish
/// completions (clap_complete), as the .deb installs them.
fn generate_assets(dir: &std::path::Path) -> anyhow::Result<Exit> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    man::write_config(&man)?;
    man::write(&man, &cmd, "qcom-reset")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("qcom-reset-{}", sub.get_name());
        man::write(&man, &sub.clone().name(name.clone()), &name)?;
    }
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "qcom-reset", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    println!("{}", dir.display());
    Ok(Exit::Ok)
}

fn config_default_path() -> std::path::PathBuf {
    std::path::PathBuf::from(qcom_reset::config::DEFAULT_PATH)
}

/// systemd's readiness protocol (Type=notify); a no-op outside systemd.
fn sd_notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("sd_notify: {e}");
    }
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// The configuration the one-shot commands honour: the given file, or the default when present.
fn device_config(path: Option<std::path::PathBuf>) -> anyhow::Result<Config> {
    let explicit = path.is_some();
    Ok(Config::load(
        &path.unwrap_or_else(config_default_path),
        explicit,
    )?)
}

/// The experimental profiles a one-shot command may use: all with `--experimental`, else the
/// configuration's list.
fn opt_in(cfg: &Config, flag: bool) -> OptIn {
    if flag {
        OptIn::all()
    } else {
        cfg.experimental.clone()
    }
}

/// "reviewed (upstream quirk: yes)" or "experimental, not opted in (...)", for `status`. A
/// profile the configuration or `--profile` names for the device is opted in.
fn profile_status(p: &qcom_reset::device::DeviceProfile, opt_in: &OptIn, named: bool) -> String {
    use qcom_reset::device::Status as ProfileStatus;
    let upstream = if p.upstream { "yes" } else { "no" };
    let quirk = p.quirk.map(|q| format!("; {q}")).unwrap_or_default();
    match p.status {
        ProfileStatus::Reviewed => format!("reviewed (upstream quirk: {upstream}){quirk}"),
        ProfileStatus::Experimental if named || opt_in.allows(p) => {
            format!("experimental, opted in (upstream quirk: {upstream}){quirk}")
        }
        ProfileStatus::Experimental => format!(
            "experimental, not opted in: nothing is written until experimental = [\"{}\"] (config) or --experimental{quirk}",
            p.name
        ),
    }
}

fn power_cycle_cmd(host: &Host, a: PowerCycleArgs) -> anyhow::Result<Exit> {
    use qcom_reset::session::power;
    let cfg = device_config(a.device.config.clone())?;
    let ids = host.sysfs.device(a.bdf).and_then(|d| d.ids()).ok();
    let by_config = cfg.device_with_ids(a.bdf, ids);
    let req = Request {
        profile: a.device.profile.clone().or(by_config.profile),
        bar: a.device.bar.or(by_config.bar),
        experimental: opt_in(&cfg, a.experimental),
        allow_dpc: cfg.allow_dpc,
        allow_unguarded_link_drop: cfg.allow_unguarded_link_drop,
        ..Request::new(a.bdf)
    };
    let t = session::inspect(host, a.bdf, req.profile.as_deref(), req.bar)?;
    // The reset after the cycle would refuse a profile not opted in: refuse before the power
    // is cut, not after.
    if !a.no_reset && req.profile.is_none() && !req.experimental.allows(&t.profile) {
        return Err(Error::Experimental {
            bdf: t.bdf,
            vendor: t.vendor,
            device: t.device,
            profile: t.profile.name,
        }
        .into());
    }
    if let Some(e) = t.refusal(false) {
        return Err(e.into());
    }
    let plan = power::plan(&host.sysfs, &t.dev, a.method)
        .map_err(|why| Error::NoPowerCycle { bdf: a.bdf, why })?;
    if a.dry_run {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            println!(
                "{}: would power-cycle through {:?} (port {}), then reset and verify",
                plan.target, plan.method, plan.port
            );
        }
        return Ok(Exit::Ok);
    }
    require_root()?;
    // Never a panic on a closed stderr (a terminal gone with SIGHUP deferred, `| tee` killed):
    // the cycle must reach its restore.
    let mut log = |s: &str| {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{}: power: {s}", a.bdf);
    };
    power::run(host, &plan, req.profile.as_deref(), req.bar, &mut log)?;
    if a.no_reset {
        return Ok(Exit::Ok);
    }
    reset_and_report(host, &req, a.device.access, a.json)
}
