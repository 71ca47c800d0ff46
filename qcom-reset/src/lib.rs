//! qcom-reset: detects failed or missing PCI resets of Qualcomm WCN6855/WCN7850 WLAN and
//! SDX62/SDX65 modems released by VFIO, and resets them through their BAR registers.
pub mod backend;
pub mod bdf;
pub mod devices;
pub mod engine;
mod error;
pub mod holders;
pub mod io;
pub mod lock;
pub mod regs;
pub mod sequence;
pub mod session;
pub mod sim;
pub mod sysfs;
pub mod verdict;

pub use error::Error;
pub type Result<T, E = Error> = std::result::Result<T, E>;
pub mod agent;
pub mod check;
pub mod probes;
