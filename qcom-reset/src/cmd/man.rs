//! The man pages the .deb installs: one per subcommand in section 8 (clap_mangen, with the
//! exit statuses, files and related pages appended) and qcom-reset.toml(5), made from the
//! shipped dist/config.toml, whose comments are the configuration's one reference.
use anyhow::Context as _;
use qcom_reset::exit::Exit;

pub fn write(dir: &std::path::Path, cmd: &clap::Command, name: &str) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut out)?;
    // `health` has node-problem-detector's codes (in its EXTRA section); every other page
    // documents the stable exit statuses.
    if name != "qcom-reset-health" {
        out.extend_from_slice(exit_status().as_bytes());
    }
    out.extend_from_slice(FILES.as_bytes());
    out.extend_from_slice(SEE_ALSO.as_bytes());
    std::fs::write(dir.join(format!("{name}.8")), out)
        .with_context(|| format!("writing the man page of {name}"))
}

fn exit_status() -> String {
    let mut s = String::from(".SH \"EXIT STATUS\"\n");
    for e in Exit::ALL {
        s.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", e.code(), e.meaning()));
    }
    s.push_str(&format!(
        ".TP\n\\fB128+N\\fR\n{}\n",
        qcom_reset::exit::SIGNALLED
    ));
    s
}

const FILES: &str = ".SH FILES
.TP
/etc/qcom-reset/config.toml, /etc/qcom-reset/conf.d/*.toml
the agent's configuration and its drop-ins (name order; see qcom-reset.toml(5))
.TP
/etc/default/qcom-reset
the hooks' settings (QCOM_RESET_PRESTART)
.TP
/run/qcom-reset/
per-device locks, crash records (BDF.json) and the running agent's status (agent.json)
.TP
/var/lib/qcom-reset/state.json, /var/log/qcom-reset/events.jsonl
attempt history; journal of events and actions (rotated weekly by logrotate)
";

const SEE_ALSO: &str = ".SH \"SEE ALSO\"
qcom-reset(8), qcom-reset-run(8), qcom-reset-health(8), qcom-reset.toml(5), systemd.exec(5),
/usr/share/doc/qcom-reset/operations.md
";

const CONFIG: &str = include_str!("../../../dist/config.toml");

/// qcom-reset.toml(5).
pub fn write_config(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("qcom-reset.toml.5"), config_page(CONFIG))
        .context("writing qcom-reset.toml(5)")
}

/// The page from the commented default file: its opening comment is the description, each
/// `key = default` with the comment above it an entry, the commented tables after the keys
/// their own section with the examples kept verbatim.
fn config_page(toml: &str) -> String {
    let mut page = format!(
        ".TH QCOM-RESET.TOML 5 \"\" \"qcom-reset {}\"\n.SH NAME\nqcom-reset.toml \\- configuration of the qcom-reset agent\n.SH DESCRIPTION\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut blocks = toml.split("\n\n");
    for line in blocks.next().unwrap_or_default().lines() {
        page.push_str(&roff(line.trim_start_matches('#').trim()));
        page.push('\n');
    }
    page.push_str(".SH KEYS\n");
    let mut comment = Vec::new();
    let mut tables = String::new();
    for line in blocks.flat_map(str::lines) {
        if let Some(text) = line.strip_prefix('#') {
            comment.push(text.strip_prefix(' ').unwrap_or(text));
        } else if let Some((key, default)) = line.split_once(" = ") {
            page.push_str(&format!(".TP\n\\fB{key}\\fR = {}\n", roff(default)));
            page.push_str(&roff(&comment.join(" ")));
            page.push('\n');
            comment.clear();
        } else if line.trim().is_empty() && !comment.is_empty() {
            tables.push_str(&table_section(&comment));
            comment.clear();
        }
    }
    if !comment.is_empty() {
        tables.push_str(&table_section(&comment));
    }
    page.push_str(".SH DEVICES\n");
    page.push_str(&tables);
    page.push_str(".SH RELOADING\n`systemctl reload qcom-reset` (SIGHUP) applies timings, attempts, rescans, bind_reset, experimental, allow_* and a device's enabled to the next event; the other keys take effect at the next restart, as the agent's log says.\n");
    page.push_str(".SH FILES\n/etc/qcom-reset/config.toml, /etc/qcom-reset/conf.d/*.toml\n");
    page.push_str(".SH \"SEE ALSO\"\nqcom-reset-run(8), /usr/share/doc/qcom-reset/operations.md\n");
    page
}

/// A commented table: prose as a paragraph, the lines that are TOML as an example.
fn table_section(comment: &[&str]) -> String {
    let toml_like = |l: &&str| l.starts_with('[') || l.contains(" = ");
    let prose: Vec<&str> = comment.iter().copied().filter(|l| !toml_like(l)).collect();
    let example: Vec<&str> = comment.iter().copied().filter(toml_like).collect();
    let mut s = format!(".PP\n{}\n", roff(&prose.join(" ")));
    if !example.is_empty() {
        s.push_str(".PP\n.nf\n");
        for l in example {
            s.push_str(&roff(l));
            s.push('\n');
        }
        s.push_str(".fi\n");
    }
    s
}

/// Text safe in roff: backslashes escaped, no line starting as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// Man pages (clap_mangen: qcom-reset.8 and qcom-reset-SUBCOMMAND.8) and bash/zsh/fish
/// completions (clap_complete), as the .deb installs them.
pub(super) fn generate_assets(dir: &std::path::Path) -> anyhow::Result<Exit> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = super::cli::Cli::command().version(env!("CARGO_PKG_VERSION"));
    write_config(&man)?;
    write(&man, &cmd, "qcom-reset")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("qcom-reset-{}", sub.get_name());
        write(&man, &sub.clone().name(name.clone()), &name)?;
    }
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(
            shell,
            &mut super::cli::Cli::command(),
            "qcom-reset",
            &completions,
        )
        .with_context(|| format!("writing {shell} completions"))?;
    }
    println!("{}", dir.display());
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_shipped_file_is_an_entry_with_its_comment() {
        let page = config_page(CONFIG);
        let keys: Vec<&str> = CONFIG
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        assert!(keys.len() > 20, "{keys:?}");
        for k in &keys {
            assert!(
                page.contains(&format!(".TP\n\\fB{k}\\fR = ")),
                "{k} missing"
            );
        }
        assert!(page.contains("\\fBdebounce_ms\\fR = 500\nEvents for one device closer together"));
        assert!(page.contains(".nf\n[devices.\"0000:03:00.0\"]\n"), "{page}");
        assert!(page.contains("ids = \"1eac:1004, 1eac:1007\""));
        assert!(page.contains("Drop-ins in /etc/qcom-reset/conf.d/*.toml"));
        assert_eq!(roff(".x \\y"), "\\&.x \\ey");
    }
}
