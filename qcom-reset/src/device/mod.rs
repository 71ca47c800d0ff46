//! The one device table: every supported device, its reset sequence and where that comes from.
//! CLI help, docs/devices.md (checked by a test), the hook examples and the default eBPF target
//! filter all derive from [`DEVICES`]; supporting a new device is one entry here.
pub mod family;
pub mod regio;
pub mod regs;
pub mod sequence;
pub mod verdict;

use serde::Serialize;

/// How a card is reset and judged: one record each in `family.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// WCN6855/WCN7850 WLAN (ath11k/ath12k's SoC global reset).
    Wlan,
    /// SDX modems (MHI SoC reset).
    Modem,
}

/// How far a profile is vetted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The device and sequence of the upstream quirk reviewed in 2026: used by default.
    Reviewed,
    /// The same reset in the device's own Linux driver, without the upstream review: used only
    /// when the configuration opts in (`experimental = ["name"]` or `["all"]`, the CLI's
    /// `--experimental`) or names the profile for the device.
    Experimental,
}

impl Status {
    /// The status's name, as the table and `status` write it.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Reviewed => "reviewed",
            Status::Experimental => "experimental",
        }
    }
}

/// One row of the device table: an ID and how it is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceProfile {
    /// Short name accepted by `--profile`; shared by every ID with the same SoC and reset.
    pub name: &'static str,
    /// The PCI vendor ID.
    pub vendor: u16,
    /// The PCI device ID.
    pub device: u16,
    /// The part's name.
    pub model: &'static str,
    /// Its reset family.
    pub family: Family,
    /// BAR holding the MHI and SoC registers.
    pub bar: u8,
    /// Upstream function whose steps the sequence replays.
    pub source: &'static str,
    /// Reviewed or experimental.
    pub status: Status,
    /// Whether the upstream quirk (~7.4) covers this ID: there the kernel resets it itself.
    pub upstream: bool,
    /// A driver quirk that matters around a reset, recorded even where it is not applied.
    pub quirk: Option<&'static str>,
}

/// Qualcomm's PCI vendor ID.
pub const QCOM_VENDOR: u16 = 0x17cb;
const QUECTEL: u16 = 0x1eac;
const FOXCONN: u16 = 0x105b;
const NETPRISMA: u16 = 0x203e;
const HP: u16 = 0x03f0;

const ATH11K: &str =
    "ath11k_pci_soc_global_reset (drivers/net/wireless/ath/ath11k/pci.c) + mhictrl reset";
const ATH12K: &str =
    "ath12k_pci_soc_global_reset (drivers/net/wireless/ath/ath12k/pci.c) + mhictrl reset";
const MHI: &str = "mhi_soc_reset (drivers/bus/mhi/host/main.c; ID from mhi_pci_id_table, pci_generic.c) + MHI_POST_RESET_DELAY_MS";
const FIX_L1SS: Option<&str> = Some(
    "ath11k fix_l1ss: the driver rewrites the L1SS timing registers at power-up; not applied (the host's L1SS settings are left as they are)",
);

/// An experimental modem sold under its maker's vendor ID, reset like the SoC it is built on.
const fn modem(name: &'static str, vendor: u16, device: u16, model: &'static str) -> DeviceProfile {
    DeviceProfile {
        name,
        vendor,
        device,
        model,
        family: Family::Modem,
        bar: 0,
        source: MHI,
        status: Status::Experimental,
        upstream: false,
        quirk: None,
    }
}

const fn wlan(
    name: &'static str,
    device: u16,
    model: &'static str,
    source: &'static str,
    quirk: Option<&'static str>,
) -> DeviceProfile {
    DeviceProfile {
        name,
        vendor: QCOM_VENDOR,
        device,
        model,
        family: Family::Wlan,
        bar: 0,
        source,
        status: Status::Experimental,
        upstream: false,
        quirk,
    }
}

/// Every device qcom-reset knows. The first entry of each name is its reference (the one
/// `--profile NAME` stands for); later entries with that name share its family and BAR.
pub const DEVICES: &[DeviceProfile] = &[
    DeviceProfile {
        name: "wcn6855",
        vendor: QCOM_VENDOR,
        device: 0x1103,
        model: "Qualcomm WCN6855 WLAN (ath11k)",
        family: Family::Wlan,
        bar: 0,
        source: "reset_qualcomm_wlan() (PCI quirk, v12, 2026-06-30) = ath11k_pci_soc_global_reset + mhictrl reset",
        status: Status::Reviewed,
        upstream: true,
        quirk: None,
    },
    DeviceProfile {
        name: "wcn7850",
        vendor: QCOM_VENDOR,
        device: 0x1107,
        model: "Qualcomm WCN7850 WLAN (ath12k)",
        family: Family::Wlan,
        bar: 0,
        source: "reset_qualcomm_wlan() (PCI quirk, v12, 2026-06-30) = ath12k_pci_soc_global_reset + mhictrl reset",
        status: Status::Reviewed,
        upstream: true,
        quirk: None,
    },
    DeviceProfile {
        name: "sdx65",
        vendor: QCOM_VENDOR,
        device: 0x0308,
        model: "Qualcomm SDX62/SDX65 5G modem (mhi-pci-generic)",
        family: Family::Modem,
        bar: 0,
        source: "reset_qualcomm_modem() (PCI quirk, v12, 2026-06-30) = mhi_soc_reset + MHI_POST_RESET_DELAY_MS",
        status: Status::Reviewed,
        upstream: true,
        quirk: None,
    },
    wlan(
        "qca6390",
        0x1101,
        "Qualcomm QCA6390 WLAN (ath11k)",
        ATH11K,
        FIX_L1SS,
    ),
    wlan(
        "qcn9074",
        0x1104,
        "Qualcomm QCN9074 WLAN (ath11k)",
        ATH11K,
        FIX_L1SS,
    ),
    wlan(
        "qcn9274",
        0x1109,
        "Qualcomm QCN9274 WLAN (ath12k)",
        ATH12K,
        None,
    ),
    modem("sdx24", QCOM_VENDOR, 0x0304, "Qualcomm SDX24 modem"),
    modem("sdx24", QUECTEL, 0x1001, "Quectel EM120R-GL (SDX24)"),
    modem("sdx24", QUECTEL, 0x1002, "Quectel EM160R-GL (SDX24)"),
    modem("sdx24", QUECTEL, 0x100d, "Quectel EM160R-GL (SDX24)"),
    modem(
        "sdx24",
        QUECTEL,
        0x2001,
        "Quectel EM120R-GL for FCCL (SDX24)",
    ),
    modem(
        "sdx24",
        FOXCONN,
        0xe0f0,
        "Foxconn T99W510 variant 1 (SDX24)",
    ),
    modem(
        "sdx24",
        FOXCONN,
        0xe0f1,
        "Foxconn T99W510 variant 2 (SDX24)",
    ),
    modem(
        "sdx24",
        FOXCONN,
        0xe0f2,
        "Foxconn T99W510 variant 3 (SDX24)",
    ),
    modem("sdx24", NETPRISMA, 0x1000, "Netprisma LCUR57 (SDX24)"),
    modem(
        "sdx55",
        QCOM_VENDOR,
        0x0306,
        "Qualcomm SDX55 modem (also Sierra EM919x, Telit FN980)",
    ),
    modem("sdx55", FOXCONN, 0xe0ab, "Foxconn T99W175 (SDX55)"),
    modem("sdx55", FOXCONN, 0xe0b0, "Dell DW5930e with eSIM (SDX55)"),
    modem("sdx55", FOXCONN, 0xe0b1, "Dell DW5930e (SDX55)"),
    modem(
        "sdx55",
        FOXCONN,
        0xe0bf,
        "Foxconn T99W175, new baseline (SDX55)",
    ),
    modem("sdx55", FOXCONN, 0xe0c3, "Foxconn T99W175 (SDX55)"),
    modem("sdx55", HP, 0x0a6c, "HP T99W175 (SDX55)"),
    modem("sdx65", QUECTEL, 0x1004, "Quectel RM520N-GL eSIM (SDX6x)"),
    modem(
        "sdx65",
        QUECTEL,
        0x1007,
        "Quectel RM520N-GL, Lenovo (SDX6x)",
    ),
    modem("sdx65", FOXCONN, 0xe0d8, "Foxconn T99W368 (SDX65)"),
    modem("sdx65", FOXCONN, 0xe0d9, "Foxconn T99W373 (SDX62)"),
    modem("sdx65", FOXCONN, 0xe0f5, "Dell DW5932e with eSIM (SDX62)"),
    modem("sdx65", FOXCONN, 0xe0f9, "Dell DW5932e (SDX62)"),
    modem("sdx65", NETPRISMA, 0x1001, "Netprisma FCUN69 (SDX6x)"),
    modem(
        "sdx72",
        QCOM_VENDOR,
        0x0309,
        "Qualcomm SDX72/SDX75 modem (also Telit FN990B40)",
    ),
    modem("sdx72", FOXCONN, 0xe118, "Foxconn T99W640 (SDX72)"),
    modem("sdx72", FOXCONN, 0xe11d, "Dell DW5934e with eSIM (SDX72)"),
    modem("sdx72", FOXCONN, 0xe11e, "Dell DW5934e (SDX72)"),
];

/// Which experimental profiles may be used: by name, or `all`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct OptIn(pub Vec<String>);

impl OptIn {
    /// Every experimental profile.
    pub fn all() -> OptIn {
        OptIn(vec!["all".into()])
    }

    /// Reviewed profiles always; experimental ones when opted in.
    pub fn allows(&self, p: &DeviceProfile) -> bool {
        p.status == Status::Reviewed
            || self
                .0
                .iter()
                .any(|n| n == "all" || n.eq_ignore_ascii_case(p.name))
    }

    /// Names that are neither `all` nor a profile with an experimental entry.
    pub fn unknown(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(String::as_str)
            .filter(|n| {
                *n != "all"
                    && !DEVICES
                        .iter()
                        .any(|d| d.status == Status::Experimental && d.name.eq_ignore_ascii_case(n))
            })
            .collect()
    }
}

/// The row for these IDs.
pub fn by_id(vendor: u16, device: u16) -> Option<&'static DeviceProfile> {
    DEVICES
        .iter()
        .find(|d| d.vendor == vendor && d.device == device)
}

/// The first row with this profile name.
pub fn by_name(name: &str) -> Option<&'static DeviceProfile> {
    DEVICES.iter().find(|d| d.name.eq_ignore_ascii_case(name))
}

/// "wcn6855, wcn7850, sdx65, ...", each name once, for help texts and error hints.
pub fn profile_names() -> String {
    let mut names: Vec<&str> = Vec::new();
    for d in DEVICES {
        if !names.contains(&d.name) {
            names.push(d.name);
        }
    }
    names.join(", ")
}

/// The experimental profile names, each once.
pub fn experimental_names() -> String {
    let mut names: Vec<&str> = Vec::new();
    for d in DEVICES.iter().filter(|d| d.status == Status::Experimental) {
        if !names.contains(&d.name) {
            names.push(d.name);
        }
    }
    names.join(", ")
}

/// Long help listing the table, used by clap.
pub fn help_table() -> String {
    let mut s = String::from("Supported devices (experimental ones only when opted in):\n");
    for d in DEVICES {
        s.push_str(&format!(
            "  {:<8} {:04x}:{:04x}  {:<6} {:<12} {}\n",
            d.name,
            d.vendor,
            d.device,
            d.family.name(),
            d.status.name(),
            d.model
        ));
    }
    s
}

/// The device matrix as docs/devices.md shows it (a test keeps the two in step).
pub fn markdown_matrix() -> String {
    let mut s = String::from(
        "| profile | vendor:device | model | family | BAR | sequence | upstream quirk | status |\n|---|---|---|---|---|---|---|---|\n",
    );
    for d in DEVICES {
        s.push_str(&format!(
            "| {} | {:04x}:{:04x} | {} | {} | {} | {} | {} | {} |\n",
            d.name,
            d.vendor,
            d.device,
            d.model,
            d.family.name(),
            d.bar,
            d.family.sequence_version(),
            if d.upstream { "yes" } else { "no" },
            d.status.name()
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
                if a.name == b.name {
                    assert_eq!((a.family, a.bar), (b.family, b.bar), "{} differs", a.name);
                }
            }
            assert!(a.bar < 6);
            // Exactly the upstream quirk's IDs are reviewed.
            assert_eq!(a.upstream, a.status == Status::Reviewed, "{}", a.model);
        }
        assert_eq!(
            DEVICES.iter().filter(|d| d.upstream).count(),
            3,
            "the quirk covers 17cb:1103, 17cb:1107, 17cb:0308"
        );
        assert_eq!(
            by_name("sdx65").unwrap().device,
            0x0308,
            "reference entry first"
        );
        assert_eq!(by_id(0x1eac, 0x1004).unwrap().name, "sdx65");
        assert_eq!(by_id(0x17cb, 0x1109).unwrap().family, Family::Wlan);
        assert!(
            by_id(0x17cb, 0x1101)
                .unwrap()
                .quirk
                .unwrap()
                .contains("fix_l1ss")
        );
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
    fn experimental_profiles_need_an_opt_in() {
        let sdx55 = by_id(0x105b, 0xe0ab).unwrap();
        let wcn = by_id(0x17cb, 0x1103).unwrap();
        assert!(OptIn::default().allows(wcn));
        assert!(!OptIn::default().allows(sdx55));
        assert!(OptIn(vec!["SDX55".into()]).allows(sdx55));
        assert!(!OptIn(vec!["sdx24".into()]).allows(sdx55));
        assert!(OptIn::all().allows(sdx55));
        assert_eq!(
            OptIn(vec![
                "sdx55".into(),
                "all".into(),
                "wcn6855".into(),
                "nope".into()
            ])
            .unknown(),
            ["wcn6855", "nope"],
            "reviewed names need no opt-in, unknown ones are typos"
        );
        assert_eq!(
            profile_names(),
            "wcn6855, wcn7850, sdx65, qca6390, qcn9074, qcn9274, sdx24, sdx55, sdx72"
        );
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
