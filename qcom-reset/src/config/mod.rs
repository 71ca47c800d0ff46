//! /etc/qcom-reset/config.toml. Every key has a default (docs/operations.md lists them); a bad
//! file is refused whole with its line and column, so the agent never starts half-configured.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::OptIn;
use serde::{Deserialize, Serialize};

use crate::access::Access;
use crate::bdf::Bdf;
use crate::probes::FlavourChoice;

mod load;
mod reload;

pub use load::ConfigError;
pub use reload::Reload;

/// Where the agent reads its configuration.
pub const DEFAULT_PATH: &str = "/etc/qcom-reset/config.toml";

/// The agent's configuration (`config.toml`); every field has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Log what would be done, never write to a device.
    pub observe_only: bool,
    /// While this file exists the agent takes no action (a global kill switch).
    pub kill_switch: PathBuf,
    /// Events for one device closer together than this are handled once.
    pub debounce_ms: u64,
    /// Failed resets of one device before the agent gives up until the cool-down ends.
    pub max_attempts: u32,
    /// Wait before the 2nd attempt; doubles with every further failure.
    pub backoff_ms: u64,
    /// After `max_attempts` failures, no attempt for this long.
    pub cooldown_s: u64,
    /// Check every target at start and after lost events (`rescan_resets` says which to reset).
    pub rescan: bool,
    /// Which targets a rescan resets (bound to vfio-pci or no driver, and not held).
    pub rescan_resets: RescanResets,
    /// A release the holder check calls "held" (e.g. QEMU closed the device but keeps the group
    /// open while shutting down) is retried when the holder goes, for up to this long.
    pub held_wait_s: u64,
    /// After a device is bound to vfio-pci, wait this long, then reset it unless something
    /// holds it by then (a VM started right after the bind, as libvirt's managed hostdevs do,
    /// is never raced); 0 = never reset on bind.
    pub bind_settle_ms: u64,
    /// Whether a bind to vfio-pci is followed by a reset: "auto" (not where qcom-reset's
    /// libvirt hook is installed: it resets at start/begin, and the bind reset's session could
    /// make a VM that opens the card late get EBUSY), "always" or "never".
    pub bind_reset: BindReset,
    /// Use our register sequence even where the kernel has `device_specific`: after the
    /// kernel's reset at release, reset again instead of only verifying.
    pub act_with_kernel_reset: bool,
    /// Append-only JSON-lines log of events and actions ("" disables it).
    pub journal: PathBuf,
    /// Attempt history, so a restart neither repeats nor forgets.
    pub state_file: PathBuf,
    /// Prometheus metrics on `metrics_listen`:PORT (0 = off).
    pub metrics_port: u16,
    /// The address the metrics server binds (loopback by default; the unit's IPAddressAllow=
    /// must allow the scrapers of any other).
    pub metrics_listen: std::net::IpAddr,
    /// The same metrics for node_exporter's textfile collector ("" = off), e.g.
    /// /var/lib/prometheus/node-exporter/qcom_reset.prom; rewritten atomically on every change.
    pub metrics_textfile: PathBuf,
    /// Which probe flavour to attach with.
    pub flavour: FlavourChoice,
    /// How registers are reached.
    pub access: Access,
    /// Experimental profiles (siblings of the reviewed parts) to use: names or `["all"]`.
    pub experimental: OptIn,
    /// Reset a card whose upstream port has DPC enabled (the link drop disables the link until
    /// DPC recovers it).
    pub allow_dpc: bool,
    /// Reset even where the upstream port's hotplug/Surprise Down reports cannot be masked
    /// (config writes refused, e.g. lockdown): the link drop may then look like a hot-unplug.
    pub allow_unguarded_link_drop: bool,
    /// Per-device settings by PCI address.
    pub devices: BTreeMap<String, DeviceConfig>,
    /// Devices added by ID, wherever they sit: `[[device]] ids = "1eac:1004" profile = "sdx65"`.
    pub device: Vec<IdRule>,
}

/// `[[device]]`: every device with one of these IDs is treated as `profile`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdRule {
    /// "vvvv:dddd", several separated by spaces or commas.
    pub ids: String,
    /// The profile the matching devices are treated as.
    pub profile: String,
    /// Their register BAR, when not the profile's.
    pub bar: Option<u8>,
}

impl IdRule {
    /// The (vendor, device) pairs, or the first that does not parse.
    pub fn parse_ids(&self) -> Result<Vec<(u16, u16)>, String> {
        self.ids
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(|id| {
                let (v, d) = id.split_once(':').ok_or(id)?;
                let hex = |x: &str| {
                    (x.len() == 4)
                        .then(|| u16::from_str_radix(x, 16).ok())
                        .flatten()
                };
                Ok((hex(v).ok_or(id)?, hex(d).ok_or(id)?))
            })
            .collect::<Result<Vec<_>, &str>>()
            .map_err(|bad| format!("{bad:?} is not vvvv:dddd (hex)"))
            .and_then(|v| {
                if v.is_empty() {
                    Err("no ids".into())
                } else {
                    Ok(v)
                }
            })
    }
}

/// Whether a bind to vfio-pci is followed by a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindReset {
    /// Not where qcom-reset's libvirt hook is installed (`LIBVIRT_HOOK` with a libvirt daemon
    /// beside it), else always.
    Auto,
    /// After every bind.
    Always,
    /// Never after a bind.
    Never,
}

/// Where the package installs the libvirt hook.
pub const LIBVIRT_HOOK: &str = "etc/libvirt/hooks/qemu.d/qcom-reset";
/// The libvirt daemons that call it (monolithic, modular).
const LIBVIRT_DAEMONS: [&str; 2] = ["usr/sbin/libvirtd", "usr/sbin/virtqemud"];

impl BindReset {
    /// Whether binds are followed by a reset on the host whose file system is at `root`.
    pub fn resolve(self, root: &Path) -> bool {
        match self {
            BindReset::Always => true,
            BindReset::Never => false,
            BindReset::Auto => !libvirt_hook_installed(root),
        }
    }
}

fn libvirt_hook_installed(root: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let hook = std::fs::metadata(root.join(LIBVIRT_HOOK));
    hook.is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        && LIBVIRT_DAEMONS.iter().any(|d| root.join(d).exists())
}

/// Which verdicts a rescan acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RescanResets {
    /// Every verdict but `clean`: a stale session left by a previous owner is reset too.
    Unclean,
    /// Only `crashed` and `not-ready`; a `stale` card is reported and left alone.
    UnhealthyOnly,
    /// Report only.
    Never,
}

impl RescanResets {
    /// Whether a card found in `h` at a rescan is reset.
    pub fn resets(self, h: crate::device::verdict::Health) -> bool {
        use crate::device::verdict::Health::*;
        match self {
            RescanResets::Unclean => h != Clean,
            RescanResets::UnhealthyOnly => matches!(h, Crashed | NotReady),
            RescanResets::Never => false,
        }
    }
}

/// Per-device settings (`[devices."0000:03:00.0"]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// false: never act on this device.
    pub enabled: Option<bool>,
    /// Treat the device as this profile (for devices not in the table, e.g. a test device).
    pub profile: Option<String>,
    /// Register BAR override.
    pub bar: Option<u8>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            observe_only: false,
            kill_switch: PathBuf::from("/etc/qcom-reset/disable"),
            debounce_ms: 500,
            max_attempts: 3,
            backoff_ms: 2000,
            cooldown_s: 600,
            rescan: true,
            rescan_resets: RescanResets::Unclean,
            held_wait_s: 60,
            bind_settle_ms: 1500,
            bind_reset: BindReset::Auto,
            act_with_kernel_reset: false,
            journal: PathBuf::from("/var/log/qcom-reset/events.jsonl"),
            state_file: PathBuf::from("/var/lib/qcom-reset/state.json"),
            metrics_port: 0,
            metrics_listen: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            metrics_textfile: PathBuf::new(),
            flavour: FlavourChoice::Auto,
            access: Access::Auto,
            experimental: OptIn::default(),
            allow_dpc: false,
            allow_unguarded_link_drop: false,
            devices: BTreeMap::new(),
            device: Vec::new(),
        }
    }
}

impl Config {
    /// A device the agent acts on: a table entry (experimental ones only when opted in), or one
    /// the configuration names a profile for.
    pub fn acts_on(&self, bdf: Bdf, vendor: u16, device: u16) -> bool {
        crate::device::by_id(vendor, device).is_some_and(|p| self.experimental.allows(p))
            || self
                .device_with_ids(bdf, Some((vendor, device)))
                .profile
                .is_some()
    }

    /// The (vendor, device) pairs added by `[[device]]`, for the eBPF target filter.
    pub fn rule_ids(&self) -> Vec<(u16, u16)> {
        self.device
            .iter()
            .flat_map(|r| r.parse_ids().unwrap_or_default())
            .collect()
    }

    /// The settings for a device: its `[devices."BDF"]` entry, else the first `[[device]]` whose
    /// ids match its (vendor, device).
    pub fn device_with_ids(&self, bdf: Bdf, ids: Option<(u16, u16)>) -> DeviceConfig {
        if let Some(d) = self.devices.get(&bdf.to_string()) {
            return d.clone();
        }
        let rule = ids.and_then(|id| {
            self.device
                .iter()
                .find(|r| r.parse_ids().is_ok_and(|v| v.contains(&id)))
        });
        match rule {
            Some(r) => DeviceConfig {
                enabled: None,
                profile: Some(r.profile.clone()),
                bar: r.bar,
            },
            None => DeviceConfig::default(),
        }
    }

    /// A one-shot command's device settings: `--profile` and `--bar` over the configuration's
    /// (its `[devices."BDF"]` entry, else the first `[[device]]` rule matching the IDs).
    pub fn resolve(
        &self,
        bdf: Bdf,
        ids: Option<(u16, u16)>,
        profile: Option<&str>,
        bar: Option<u8>,
    ) -> DeviceConfig {
        let by_config = self.device_with_ids(bdf, ids);
        DeviceConfig {
            enabled: by_config.enabled,
            profile: profile.map(str::to_string).or(by_config.profile),
            bar: bar.or(by_config.bar),
        }
    }

    /// The settings of `bdf` (defaults when it has none).
    pub fn device(&self, bdf: Bdf) -> DeviceConfig {
        self.devices
            .get(&bdf.to_string())
            .cloned()
            .unwrap_or_default()
    }

    /// Devices configured with an explicit profile, by address or by ID among `present`
    /// (address, (vendor, device)): (address, profile, BAR).
    pub fn overrides(&self, present: &[(Bdf, (u16, u16))]) -> Vec<(Bdf, String, Option<u8>)> {
        let mut out: Vec<(Bdf, String, Option<u8>)> = self
            .devices
            .iter()
            .filter_map(|(a, d)| Some((a.parse().ok()?, d.profile.clone()?, d.bar)))
            .collect();
        for &(bdf, ids) in present {
            if out.iter().any(|o| o.0 == bdf) {
                continue;
            }
            if let DeviceConfig {
                profile: Some(p),
                bar,
                ..
            } = self.device_with_ids(bdf, Some(ids))
            {
                out.push((bdf, p, bar));
            }
        }
        out
    }

    /// How long a bind settles before the card is looked at.
    pub fn bind_settle(&self) -> Duration {
        Duration::from_millis(self.bind_settle_ms)
    }

    /// How long the agent waits for a holder to let go.
    pub fn held_wait(&self) -> Duration {
        Duration::from_secs(self.held_wait_s)
    }

    /// How long events are gathered before the agent acts.
    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20: where the libvirt hook resets at start/begin, the bind reset (whose session
    /// could make a late-opening QEMU get EBUSY) is off by default; a hook file without a
    /// libvirt daemon (the package on Proxmox) or one not executable does not count.
    #[test]
    fn bind_reset_auto_is_off_only_where_the_libvirt_hook_runs() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert!(BindReset::Auto.resolve(root));
        let hook = root.join(LIBVIRT_HOOK);
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(&hook, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(BindReset::Auto.resolve(root), "no libvirt daemon: Proxmox");
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::write(root.join("usr/sbin/virtqemud"), "").unwrap();
        assert!(!BindReset::Auto.resolve(root));
        assert!(BindReset::Always.resolve(root));
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(BindReset::Auto.resolve(root), "a hook libvirt cannot run");
        assert!(!BindReset::Never.resolve(Path::new("/nonexistent")));
    }

    /// conf.d drop-ins (what fleet tooling writes, no dpkg conffile prompt): name order, keys
    /// replaced, per-address tables merged, `[[device]]` rules added, and an error names the
    /// drop-in with its line.
    #[test]
    fn drop_ins_merge_in_name_order_and_errors_name_the_file() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("config.toml");
        std::fs::write(
            &main,
            "debounce_ms = 100\n[devices.\"0000:03:00.0\"]\nenabled = false\n[[device]]\nids = \"1eac:1004\"\nprofile = \"sdx65\"\n",
        )
        .unwrap();
        let d = t.path().join("conf.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("20-b.toml"), "debounce_ms = 300\n").unwrap();
        std::fs::write(
            d.join("10-a.toml"),
            "debounce_ms = 200\nmax_attempts = 5\n[devices.\"0000:03:00.0\"]\nbar = 2\n[[device]]\nids = \"1eac:1007\"\nprofile = \"sdx65\"\n",
        )
        .unwrap();
        std::fs::write(d.join("README"), "not toml").unwrap();
        std::fs::write(d.join(".#10-a.toml"), "half written").unwrap();
        let c = Config::load(&main, true).unwrap();
        assert_eq!((c.debounce_ms, c.max_attempts), (300, 5));
        let dev = &c.devices["0000:03:00.0"];
        assert_eq!((dev.enabled, dev.bar), (Some(false), Some(2)));
        assert_eq!(c.device.len(), 2);
        std::fs::write(d.join("30-bad.toml"), "\nmax_attempts = \"many\"\n").unwrap();
        let e = Config::load(&main, true).unwrap_err().to_string();
        assert!(e.contains("30-bad.toml:2:16"), "{e}");
        // Drop-ins alone, with no main file at the default path, apply too.
        std::fs::remove_file(&main).unwrap();
        std::fs::remove_file(d.join("30-bad.toml")).unwrap();
        assert_eq!(Config::load(&main, false).unwrap().debounce_ms, 300);
    }

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("config.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults_and_keys_parse() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse(
            "observe_only = true\nmax_attempts = 5\n[devices.\"0000:00:03.0\"]\nprofile = \"wcn6855\"\nbar = 2\n",
        )
        .unwrap();
        assert!(c.observe_only);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(
            c.overrides(&[]),
            vec![(
                "0000:00:03.0".parse().unwrap(),
                "wcn6855".to_string(),
                Some(2)
            )]
        );
    }

    #[test]
    fn devices_are_added_by_id_and_experimental_profiles_opted_into() {
        let c = parse(
            "experimental = [\"sdx55\"]\n[[device]]\nids = \"1eac:1004, 1eac:1007\"\nprofile = \"sdx65\"\n[[device]]\nids = \"1af4:1110\"\nprofile = \"wcn6855\"\nbar = 2\n[devices.\"0000:05:00.0\"]\nprofile = \"sdx24\"\n",
        )
        .unwrap();
        let (a, b, x): (Bdf, Bdf, Bdf) = (
            "0000:03:00.0".parse().unwrap(),
            "0000:04:00.0".parse().unwrap(),
            "0000:05:00.0".parse().unwrap(),
        );
        assert_eq!(
            c.device_with_ids(a, Some((0x1eac, 0x1007)))
                .profile
                .as_deref(),
            Some("sdx65")
        );
        assert_eq!(c.device_with_ids(a, Some((0x1eac, 0x1001))).profile, None);
        // The address entry wins over a rule matching its IDs.
        assert_eq!(
            c.device_with_ids(x, Some((0x1eac, 0x1004)))
                .profile
                .as_deref(),
            Some("sdx24")
        );
        assert_eq!(
            c.overrides(&[
                (a, (0x1eac, 0x1004)),
                (b, (0x1af4, 0x1110)),
                (x, (0x1eac, 0x1004))
            ]),
            vec![
                (x, "sdx24".to_string(), None),
                (a, "sdx65".to_string(), None),
                (b, "wcn6855".to_string(), Some(2)),
            ]
        );
        assert_eq!(
            c.rule_ids(),
            [(0x1eac, 0x1004), (0x1eac, 0x1007), (0x1af4, 0x1110)]
        );
        assert_eq!(c.experimental, OptIn(vec!["sdx55".into()]));
        for (bad, says) in [
            (
                "[[device]]\nids = \"1eac-1004\"\nprofile = \"sdx65\"\n",
                "not vvvv:dddd",
            ),
            ("[[device]]\nids = \"\"\nprofile = \"sdx65\"\n", "no ids"),
            (
                "[[device]]\nids = \"1eac:1004\"\nprofile = \"x\"\n",
                "unknown profile",
            ),
            (
                "[[device]]\nids = \"1eac:1004\"\nprofile = \"sdx65\"\nbar = 7\n",
                "bar must be",
            ),
            ("experimental = [\"sdx99\"]\n", "not experimental profiles"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("debounce_ms = 10\nmax_attempts = \"three\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.toml:2:16:"), "{e}");
        let e = parse("debounce_ms = 10\n\nfoo = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config.toml:3:1:") && e.contains("unknown field"),
            "{e}"
        );
        let e = parse("[devices.\"03:00\"]\nenabled = false\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed PCI address"), "{e}");
        let e = parse("[devices.\"0000:03:00.0\"]\nprofile = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown profile"), "{e}");
        assert!(
            parse("max_attempts = 0")
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
    }

    #[test]
    fn the_shipped_example_is_exactly_the_defaults() {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/config.toml"));
        assert_eq!(
            Config::load(p, true).unwrap(),
            Config::default(),
            "dist/config.toml drifted from the defaults"
        );
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let p = Path::new("/nonexistent/qcom-reset.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(p, true),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn a_reload_applies_the_policy_and_keeps_what_was_set_up_at_start() {
        let running = Config::parse(
            "debounce_ms = 100\njournal = \"/a\"\n[devices.\"0000:03:00.0\"]\nprofile = \"sdx65\"\n",
            Path::new("c"),
        )
        .unwrap();
        let new = Config::parse(
            "debounce_ms = 300\nmax_attempts = 5\njournal = \"/b\"\nflavour = \"kprobe\"\n\
             [devices.\"0000:03:00.0\"]\nenabled = false\nprofile = \"wcn6855\"\n\
             [devices.\"0000:04:00.0\"]\nenabled = false\n",
            Path::new("c"),
        )
        .unwrap();
        let r = running.reload(new);
        assert_eq!((r.cfg.debounce_ms, r.cfg.max_attempts), (300, 5));
        assert_eq!(r.cfg.journal, PathBuf::from("/a"));
        assert_eq!(r.cfg.flavour, running.flavour);
        let d3 = &r.cfg.devices["0000:03:00.0"];
        assert_eq!(
            (d3.enabled, d3.profile.as_deref()),
            (Some(false), Some("sdx65"))
        );
        assert_eq!(r.cfg.devices["0000:04:00.0"].enabled, Some(false));
        assert_eq!(r.applied, ["debounce_ms", "devices", "max_attempts"]);
        assert_eq!(
            r.at_restart,
            ["journal", "flavour", "devices.\"0000:03:00.0\" profile/bar"]
        );
        // A device's profile survives its table going away; the same file changes nothing.
        let r = running.reload(Config::default());
        assert_eq!(
            r.cfg.devices["0000:03:00.0"].profile.as_deref(),
            Some("sdx65")
        );
        assert_eq!(
            r.at_restart,
            ["journal", "devices.\"0000:03:00.0\" profile/bar"]
        );
        let same = running.reload(running.clone());
        assert!(same.applied.is_empty() && same.at_restart.is_empty());
        assert_eq!(same.cfg, running);
    }
}
