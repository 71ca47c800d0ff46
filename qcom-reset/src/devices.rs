//! The one device table: every supported device, its reset sequence and where that comes from.
//! CLI help, docs/devices.md (checked by a test), the hook examples and the default eBPF target
//! filter all derive from [`DEVICES`]; supporting a new device is one entry here.
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Wlan,
    Modem,
}

impl Family {
    /// Version of our copy of the reviewed upstream sequence; logged with every step.
    pub const fn sequence_version(self) -> &'static str {
        match self {
            Family::Wlan => "wlan-soc-global-reset/v12",
            Family::Modem => "modem-mhi-soc-reset/v12",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Family::Wlan => "wlan",
            Family::Modem => "modem",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceProfile {
    /// Short name accepted by `--profile`.
    pub name: &'static str,
    pub vendor: u16,
    pub device: u16,
    pub model: &'static str,
    pub family: Family,
    /// BAR holding the MHI and SoC registers.
    pub bar: u8,
    /// Upstream function whose steps the sequence replays.
    pub source: &'static str,
}

pub const QCOM_VENDOR: u16 = 0x17cb;

pub const DEVICES: &[DeviceProfile] = &[
    DeviceProfile {
        name: "wcn6855",
        vendor: QCOM_VENDOR,
        device: 0x1103,
        model: "Qualcomm WCN6855 WLAN (ath11k)",
        family: Family::Wlan,
        bar: 0,
        source: "reset_qualcomm_wlan() (PCI quirk, v12, 2026-06-30) = ath11k_pci_soc_global_reset + mhictrl reset",
    },
    DeviceProfile {
        name: "wcn7850",
        vendor: QCOM_VENDOR,
        device: 0x1107,
        model: "Qualcomm WCN7850 WLAN (ath12k)",
        family: Family::Wlan,
        bar: 0,
        source: "reset_qualcomm_wlan() (PCI quirk, v12, 2026-06-30) = ath12k_pci_soc_global_reset + mhictrl reset",
    },
    DeviceProfile {
        name: "sdx65",
        vendor: QCOM_VENDOR,
        device: 0x0308,
        model: "Qualcomm SDX62/SDX65 5G modem (mhi-pci-generic)",
        family: Family::Modem,
        bar: 0,
        source: "reset_qualcomm_modem() (PCI quirk, v12, 2026-06-30) = mhi_soc_reset + MHI_POST_RESET_DELAY_MS",
    },
];

pub fn by_id(vendor: u16, device: u16) -> Option<&'static DeviceProfile> {
    DEVICES
        .iter()
        .find(|d| d.vendor == vendor && d.device == device)
}

pub fn by_name(name: &str) -> Option<&'static DeviceProfile> {
    DEVICES.iter().find(|d| d.name.eq_ignore_ascii_case(name))
}

/// "wcn6855, wcn7850, sdx65", for help texts and error hints.
pub fn profile_names() -> String {
    DEVICES
        .iter()
        .map(|d| d.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Long help listing the table, used by clap.
pub fn help_table() -> String {
    let mut s = String::from("Supported devices:\n");
    for d in DEVICES {
        s.push_str(&format!(
            "  {:<8} {:04x}:{:04x}  {:<6} BAR{}  {}\n",
            d.name,
            d.vendor,
            d.device,
            d.family.name(),
            d.bar,
            d.model
        ));
    }
    s
}

/// The device matrix as docs/devices.md shows it (a test keeps the two in step).
pub fn markdown_matrix() -> String {
    let mut s = String::from(
        "| profile | vendor:device | model | family | BAR | sequence |\n|---|---|---|---|---|---|\n",
    );
    for d in DEVICES {
        s.push_str(&format!(
            "| {} | {:04x}:{:04x} | {} | {} | {} | {} |\n",
            d.name,
            d.vendor,
            d.device,
            d.model,
            d.family.name(),
            d.bar,
            d.family.sequence_version()
        ));
    }
    s
}

/// The device's profile: an explicit `--profile` override wins, else the table by ID.
pub fn resolve(
    vendor: u16,
    device: u16,
    profile: Option<&str>,
    bar: Option<u8>,
) -> Result<DeviceProfile, crate::Error> {
    let base = match profile {
        Some(name) => {
            *by_name(name).ok_or_else(|| crate::Error::UnknownProfile(name.to_string()))?
        }
        None => *by_id(vendor, device).ok_or(crate::Error::NotTarget { vendor, device })?,
    };
    Ok(DeviceProfile {
        bar: bar.unwrap_or(base.bar),
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for (i, a) in DEVICES.iter().enumerate() {
            for b in &DEVICES[i + 1..] {
                assert_ne!((a.vendor, a.device), (b.vendor, b.device), "duplicate id");
                assert_ne!(a.name, b.name, "duplicate profile name");
            }
            assert!(a.bar < 6);
        }
        assert_eq!(by_id(0x17cb, 0x1107).unwrap().family, Family::Wlan);
        assert_eq!(by_id(0x17cb, 0x0308).unwrap().family, Family::Modem);
        assert!(by_id(0x8086, 0x1107).is_none());
    }

    #[test]
    fn docs_matrix_matches_the_table() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/devices.md"))
                .expect("docs/devices.md");
        assert!(
            doc.contains(&markdown_matrix()),
            "docs/devices.md is out of date; paste this matrix:\n{}",
            markdown_matrix()
        );
        for d in DEVICES {
            assert!(
                doc.contains(d.source),
                "docs/devices.md lacks the source of {}",
                d.name
            );
        }
    }

    #[test]
    fn override_needs_a_known_profile() {
        let p = resolve(0x1af4, 0x1110, Some("WCN6855"), Some(2)).unwrap();
        assert_eq!((p.family, p.bar), (Family::Wlan, 2));
        assert!(matches!(
            resolve(0x1af4, 0x1110, None, None),
            Err(crate::Error::NotTarget { .. })
        ));
        assert!(matches!(
            resolve(0x17cb, 0x1103, Some("foo"), None),
            Err(crate::Error::UnknownProfile(_))
        ));
    }
}
