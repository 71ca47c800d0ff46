//! qcom-reset: detects failed or missing PCI resets of Qualcomm WCN6855/WCN7850 WLAN and
//! SDX62/SDX65 modems released by VFIO, and resets them through their BAR registers.
#![warn(missing_docs)]
pub mod access;
pub mod bdf;
pub mod config;
pub mod device;
mod error;
pub mod exit;
pub mod health;
pub mod host;
pub mod pci;

pub mod session;
pub mod signals;
pub mod sim;

pub use access::failure::{MapFailure, MapStep};
pub use error::{Error, GuardFailure};
pub use host::own::NotOwnable;
pub use session::port::PortDefect;
pub use session::record::RecordDefect;
/// The library's result: its error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
pub mod agent;
pub mod probes;

#[cfg(test)]
mod tests {
    /// The integration tests live in the workspace's `tests/`, outside this package, so each
    /// needs a `[[test]]` entry; one without would silently never run.
    #[test]
    fn every_integration_test_file_is_wired() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(root.join("../tests"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".rs"))
            .collect();
        files.sort();
        assert!(files.len() >= 5, "tests/ has {files:?}");
        for f in files {
            assert!(
                manifest.contains(&format!("path = \"../tests/{f}\"")),
                "tests/{f} has no [[test]] entry in qcom-reset/Cargo.toml: it would never run"
            );
        }
    }
}
