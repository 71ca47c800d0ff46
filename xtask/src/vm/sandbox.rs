//! The shipped unit's restrictions for the lab's guest, which has no systemd to apply them: the
//! syscalls `SystemCallFilter=` allows (its groups expanded by this machine's
//! `systemd-analyze syscall-filter`) and the capabilities `CapabilityBoundingSet=` keeps, for
//! `vmlab-guest unit-sandbox`. Every `qcom-reset run` in the guest goes through it.
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::workspace_root;

/// Where the list goes in the guest, and the wrapper that puts `run` under it (the binary
/// itself lives in /usr/lib/qcom-reset; `pidof qcom-reset` still finds the agent).
pub const FILE: &str = "/etc/qcom-reset/unit-sandbox";
pub const BINARY: &str = "/usr/lib/qcom-reset/qcom-reset";
pub const WRAPPER: &str = "#!/bin/sh
# The agent runs as the unit runs it (cargo xtask, xtask/src/vm/sandbox.rs).
if [ \"$1\" = run ]; then
    exec vmlab-guest unit-sandbox /etc/qcom-reset/unit-sandbox /usr/lib/qcom-reset/qcom-reset \"$@\"
fi
exec /usr/lib/qcom-reset/qcom-reset \"$@\"
";

/// `syscall NAME` and `cap CAP_NAME` lines from the unit's own directives.
pub fn file() -> anyhow::Result<String> {
    let unit = std::fs::read_to_string(workspace_root().join("dist/qcom-reset.service"))?;
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .context("running systemd-analyze syscall-filter (systemd)")?;
    let groups = groups(&String::from_utf8_lossy(&out.stdout));
    let mut syscalls = BTreeSet::new();
    for entry in directive(&unit, "SystemCallFilter")? {
        expand(&entry, &groups, &mut syscalls)?;
    }
    let mut text = String::new();
    for s in &syscalls {
        text.push_str(&format!("syscall {s}\n"));
    }
    for cap in directive(&unit, "CapabilityBoundingSet")? {
        text.push_str(&format!("cap {cap}\n"));
    }
    Ok(text)
}

/// The words of a directive the unit sets once, as an allow-list.
pub fn directive(unit: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{name}=");
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    match values.as_slice() {
        [v] if !v.starts_with('~') => Ok(v.split_whitespace().map(str::to_string).collect()),
        _ => bail!("the unit must set {name}= once, as an allow-list: {values:?}"),
    }
}

/// `@group` → its entries, from `systemd-analyze syscall-filter`'s listing.
fn groups(listing: &str) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
        } else if line.starts_with(' ')
            && !line.trim_start().starts_with('#')
            && let Some(g) = &current
        {
            groups
                .entry(g.clone())
                .or_default()
                .push(line.trim().to_string());
        } else if !line.starts_with(' ') {
            current = None;
        }
    }
    groups
}

fn expand(
    entry: &str,
    groups: &BTreeMap<String, Vec<String>>,
    out: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    if !entry.starts_with('@') {
        out.insert(entry.to_string());
        return Ok(());
    }
    let members = groups
        .get(entry)
        .with_context(|| format!("systemd-analyze does not know {entry}"))?;
    for m in members {
        expand(m, groups, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_recursively_and_the_unit_is_an_allow_list() {
        let listing = "@default\n    # always\n    brk\n    read\n\n@system-service\n    # what services use\n    @default\n    ioctl\n";
        let g = groups(listing);
        let mut out = BTreeSet::new();
        expand("@system-service", &g, &mut out).unwrap();
        expand("bpf", &g, &mut out).unwrap();
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            ["bpf", "brk", "ioctl", "read"]
        );
        assert!(expand("@nope", &g, &mut BTreeSet::new()).is_err());
        let unit =
            "[Service]\nSystemCallFilter=@system-service bpf\nCapabilityBoundingSet=CAP_BPF\n";
        assert_eq!(
            directive(unit, "SystemCallFilter").unwrap(),
            ["@system-service", "bpf"]
        );
        assert!(directive("SystemCallFilter=~@mount\n", "SystemCallFilter").is_err());
        assert!(directive("", "CapabilityBoundingSet").is_err());
    }

    #[test]
    fn the_shipped_unit_gives_the_agent_what_it_loads_probes_with() {
        let text = file().unwrap();
        for needed in [
            "syscall bpf",
            "syscall perf_event_open",
            "syscall ioctl",
            "cap CAP_BPF",
        ] {
            assert!(
                text.lines().any(|l| l == needed),
                "{needed} missing:\n{text}"
            );
        }
        assert!(!text.contains("CAP_SYS_RESOURCE"));
    }
}
