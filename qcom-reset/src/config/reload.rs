//! A reload (SIGHUP): the keys that take effect at once, and those left until a restart.

use super::{Config, DeviceConfig};

/// What a reload (SIGHUP, `systemctl reload qcom-reset`) did: the configuration the agent now
/// runs with, the keys that changed, and those left as they were until a restart.
#[derive(Debug)]
pub struct Reload {
    /// The configuration the agent runs with now.
    pub cfg: Config,
    /// The keys whose change took effect.
    pub applied: Vec<String>,
    /// The keys whose change waits for a restart.
    pub at_restart: Vec<String>,
}

impl Config {
    /// Applies `new` onto this running configuration. The keys that shape what was set up at
    /// start stay as they are until a restart: the probes' flavour and in-kernel ID filter
    /// (`[[device]]` rules, a device's `profile`/`bar`), the BAR access, the journal, state and
    /// metrics files and listener, and observe-only (the agent's mode, which `health` reports).
    /// Everything else (timings, attempts, rescans, bind resets, opt-ins, a device's `enabled`)
    /// applies to the next decision; a session in flight finishes with what it started with.
    pub fn reload(&self, mut new: Config) -> Reload {
        let mut at_restart = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if new.$field != self.$field {
                    at_restart.push(stringify!($field).to_string());
                    new.$field = self.$field.clone();
                }
            )*};
        }
        keep!(
            observe_only,
            journal,
            state_file,
            metrics_port,
            metrics_listen,
            metrics_textfile
        );
        keep!(flavour, access, device);
        for (bdf, d) in &mut new.devices {
            let old = self.devices.get(bdf).cloned().unwrap_or_default();
            if (d.profile.as_ref(), d.bar) != (old.profile.as_ref(), old.bar) {
                at_restart.push(format!("devices.\"{bdf}\" profile/bar"));
                (d.profile, d.bar) = (old.profile, old.bar);
            }
        }
        for (bdf, old) in &self.devices {
            if !new.devices.contains_key(bdf) && (old.profile.is_some() || old.bar.is_some()) {
                at_restart.push(format!("devices.\"{bdf}\" profile/bar"));
                new.devices.insert(
                    bdf.clone(),
                    DeviceConfig {
                        enabled: None,
                        ..old.clone()
                    },
                );
            }
        }
        let applied = changed_keys(self, &new);
        Reload {
            cfg: new,
            applied,
            at_restart,
        }
    }
}

/// The top-level keys whose values differ.
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (
        serde_json::to_value(a).expect("a config serializes"),
        serde_json::to_value(b).expect("a config serializes"),
    ) else {
        unreachable!("a config is a table")
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}
