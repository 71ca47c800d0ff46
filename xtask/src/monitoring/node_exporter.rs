//! The agent's textfile read by a real node_exporter, as its own unprivileged user.
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use super::{AGENT_METRICS, NODE_EXPORTER, is_root};

/// node_exporter, killed and reaped when dropped (every exit path of the check), and killed by
/// the kernel should xtask itself die (PR_SET_PDEATHSIG).
pub(super) struct NodeExporter {
    child: Child,
    log: PathBuf,
}

/// uid and gid of a user.
pub(super) fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam reads the user database and returns null or a pointer to static storage,
    // read at once (xtask does not call getpw* from other threads).
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points to a valid passwd.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(super) fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected response: {}",
            resp.lines().next().unwrap_or("")
        ))),
    }
}

/// The sample, copied with its mode into a directory of its own as `qcom_reset.prom`, read by
/// node_exporter's textfile collector (nothing else collected) running as `prometheus` (Debian's
/// node_exporter user) or `nobody`: no scrape error, and every family typed as in the contract
/// (an OpenMetrics counter, `# TYPE x counter` + `x_total`, arrives untyped).
pub(super) fn scrape_through_node_exporter(sample: &Path, tmp: &Path) -> anyhow::Result<String> {
    let dir = tmp.join("textfile");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.join("qcom_reset.prom");
    // std::fs::copy keeps the mode: a 0600 sample stays unreadable to node_exporter's user.
    std::fs::copy(sample, &file).with_context(|| format!("copying {}", sample.display()))?;
    let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
    let port = free_port()?;
    let (mut exporter, user) = start_exporter(&dir, tmp, port, mode)?;
    let body = scrape(&mut exporter, port)?;
    let log = exporter.log();
    drop(exporter);
    let problems = problems(&body, mode, &user, &log);
    ensure!(
        problems.is_empty(),
        "through node_exporter (as {user}):\n{}",
        problems.join("\n")
    );
    Ok(format!(
        "node_textfile_scrape_error 0 and {} families typed as agreed, read as {user} (mode {mode:o})",
        AGENT_METRICS.len()
    ))
}

/// node_exporter with only its textfile collector on `dir`, as its own user when root (the
/// name of whom it runs as is returned).
pub(super) fn start_exporter(
    dir: &Path,
    tmp: &Path,
    port: u16,
    mode: u32,
) -> anyhow::Result<(NodeExporter, String)> {
    let log = tmp.join("node_exporter.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new(NODE_EXPORTER);
    cmd.args([
        "--collector.disable-defaults",
        "--collector.textfile",
        "--web.disable-exporter-metrics",
    ])
    .arg(format!("--collector.textfile.directory={}", dir.display()))
    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
    .stdin(Stdio::null())
    .stdout(out.try_clone()?)
    .stderr(out);
    let user = if is_root() {
        let (name, (uid, gid)) = ["prometheus", "nobody"]
            .into_iter()
            .find_map(|n| user_ids(n).map(|ids| (n, ids)))
            .context("neither a prometheus nor a nobody user")?;
        // As setpriv/runuser would: groups dropped (std calls setgroups(0) as root), gid, uid.
        cmd.uid(uid).gid(gid);
        name.to_string()
    } else {
        // Not root: node_exporter runs as this user, who owns the copy; the mode is what tells.
        ensure!(
            mode & 0o004 != 0,
            "the sample's mode is {mode:o}: node_exporter's user (prometheus) cannot read it"
        );
        "this user".to_string()
    };
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let exporter = NodeExporter {
        child: cmd
            .spawn()
            .with_context(|| format!("starting {NODE_EXPORTER}"))?,
        log,
    };

    Ok((exporter, user))
}

/// `/metrics`, once node_exporter answers (10 s at most).
pub(super) fn scrape(exporter: &mut NodeExporter, port: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Some(status) = exporter.child.try_wait()? {
            bail!("node_exporter exited ({status}):\n{}", exporter.log());
        }
        match http_get(port, "/metrics") {
            Ok(body) => break body,
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "node_exporter on 127.0.0.1:{port} did not answer in 10 s ({e}):\n{}",
                    exporter.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    Ok(body)
}

/// What is wrong with the scrape: a textfile error, the file not read, a family missing,
/// mistyped or outside the contract.
pub(super) fn problems(body: &str, mode: u32, user: &str, log: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !body.lines().any(|l| l == "node_textfile_scrape_error 0") {
        let line = body
            .lines()
            .find(|l| l.starts_with("node_textfile_scrape_error"))
            .unwrap_or("no node_textfile_scrape_error");
        problems.push(format!(
            "{line} (sample mode {mode:o}, read as {user}); node_exporter's log:\n{}",
            log.trim_end()
        ));
    }
    if !body
        .lines()
        .any(|l| l.starts_with("node_textfile_mtime_seconds{") && l.contains("qcom_reset.prom"))
    {
        problems.push("no node_textfile_mtime_seconds for qcom_reset.prom".into());
    }
    let typed: BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.split_once(' '))
        .collect();
    for (family, kind, _) in AGENT_METRICS {
        match typed.get(family) {
            Some(k) if *k == kind.as_str() => {}
            Some(k) => problems.push(format!("{family} arrives as {k}, want {}", kind.as_str())),
            None => problems.push(format!("{family} does not arrive")),
        }
    }
    for (name, kind) in &typed {
        if name.starts_with("qcom_reset_") && !AGENT_METRICS.iter().any(|m| m.0 == *name) {
            problems.push(format!("{name} arrives as {kind}: not in the contract"));
        }
    }
    problems
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeExporter {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
