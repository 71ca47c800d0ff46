//! Checks the register writes a device received against the reviewed sequence: order, values
//! and the minimum delays. The simulator applies it to whatever drove it, so a wrong sequence
//! fails even if the model happened to recover.
use serde::Serialize;

use super::model::WriteRecord;
use crate::devices::Family;
use crate::regs::*;

/// Allowed shortfall on a minimum delay, for the shared-memory server's polling latency.
pub const SLACK_US: u64 = 500;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conformance {
    pub ok: bool,
    pub problems: Vec<String>,
}

/// `initial_global_reset`: what 0x3008 read before the sequence (the assert must be exactly
/// that value with bit 0 set).
pub fn check(family: Family, writes: &[WriteRecord], initial_global_reset: u32) -> Conformance {
    let mut problems = Vec::new();
    let mut expect = |i: usize,
                      offset: u32,
                      ok_value: &dyn Fn(u32) -> bool,
                      what: &str|
     -> Option<&WriteRecord> {
        match writes.get(i) {
            Some(w) if w.offset == offset && ok_value(w.value) => Some(w),
            Some(w) => {
                problems.push(format!(
                    "write {}: expected {what}, got {:#x} <- {:#x}",
                    i + 1,
                    w.offset,
                    w.value
                ));
                None
            }
            None => {
                problems.push(format!("write {}: expected {what}, got nothing", i + 1));
                None
            }
        }
    };
    let n = match family {
        Family::Wlan => {
            let a = expect(
                0,
                PCIE_SOC_GLOBAL_RESET,
                &|v| v == initial_global_reset | GLOBAL_RESET_V,
                "assert 0x3008 (the value read | 1)",
            )
            .cloned();
            let want = a.as_ref().map(|a| a.value & !GLOBAL_RESET_V);
            let d = expect(
                1,
                PCIE_SOC_GLOBAL_RESET,
                &|v| Some(v) == want,
                "deassert 0x3008 (value & ~1)",
            )
            .cloned();
            let m = expect(2, MHICTRL, &|v| v == MHICTRL_RESET, "MHICTRL <- 0x2").cloned();
            let mut gap =
                |from: &Option<WriteRecord>, to: &Option<WriteRecord>, min_ms: u64, what: &str| {
                    if let (Some(f), Some(t)) = (from, to)
                        && t.at_us + SLACK_US < f.at_us + min_ms * 1000
                    {
                        problems.push(format!(
                            "{what}: {} us, need at least {min_ms} ms",
                            t.at_us - f.at_us
                        ));
                    }
                };
            gap(&a, &d, 10, "assert held");
            gap(&d, &m, 10, "MHI reset after deassert");
            3
        }
        Family::Modem => {
            expect(0, MHI_SOC_RESET_REQ, &|v| v == 1, "MHI_SOC_RESET_REQ <- 1");
            1
        }
    };
    if writes.len() > n {
        problems.push(format!(
            "{} unexpected extra write(s), first {:#x} <- {:#x}",
            writes.len() - n,
            writes[n].offset,
            writes[n].value
        ));
    }
    Conformance {
        ok: problems.is_empty(),
        problems,
    }
}
