//! Checks the register writes a device received against the reviewed sequence: order, values
//! and the minimum delays. The simulator applies it to whatever drove it, so a wrong sequence
//! fails even if the model happened to recover.
use serde::Serialize;

use super::model::WriteRecord;
use crate::device::Family;
use crate::device::regs::*;

/// Allowed shortfall on a minimum delay, for the shared-memory server's polling latency.
pub const SLACK_US: u64 = 500;

/// Whether the writes the card saw follow the reviewed sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conformance {
    /// They do.
    pub ok: bool,
    /// Where they do not, in words.
    pub problems: Vec<String>,
    /// Complete sequences received one after the other: one per reset, whoever ran it (the
    /// agent, or a kernel with the device-specific reset at every VFIO open and release).
    pub sequences: usize,
}

/// `initial_global_reset`: what 0x3008 read before the first sequence (each assert must be
/// exactly the value read with bit 0 set; a completed reset leaves the deasserted value).
pub fn check(family: Family, writes: &[WriteRecord], initial_global_reset: u32) -> Conformance {
    let mut problems = Vec::new();
    let (mut at, mut sequences, mut read) = (0, 0, initial_global_reset);
    // At least one sequence is owed once anything was written.
    while at < writes.len() {
        let before = problems.len();
        let (n, deasserted) = one(family, &writes[at..], at, read, &mut problems);
        if problems.len() > before {
            break;
        }
        sequences += 1;
        at += n;
        read = deasserted.unwrap_or(read);
    }
    Conformance {
        ok: problems.is_empty(),
        problems,
        sequences,
    }
}

/// One sequence at the start of `writes` (write `base + 1` of all): its length and, for WLAN,
/// the deasserted 0x3008 value it left.
fn one(
    family: Family,
    writes: &[WriteRecord],
    base: usize,
    initial_global_reset: u32,
    problems: &mut Vec<String>,
) -> (usize, Option<u32>) {
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
                    base + i + 1,
                    w.offset,
                    w.value
                ));
                None
            }
            None => {
                problems.push(format!(
                    "write {}: expected {what}, got nothing",
                    base + i + 1
                ));
                None
            }
        }
    };
    match family {
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
            (3, d.map(|d| d.value))
        }
        Family::Modem => {
            expect(0, MHI_SOC_RESET_REQ, &|v| v == 1, "MHI_SOC_RESET_REQ <- 1");
            (1, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(at_ms: u64, offset: u32, value: u32) -> WriteRecord {
        WriteRecord {
            at_us: at_ms * 1000,
            offset,
            value,
        }
    }

    fn wlan(start_ms: u64, read: u32) -> [WriteRecord; 3] {
        [
            w(start_ms, PCIE_SOC_GLOBAL_RESET, read | GLOBAL_RESET_V),
            w(start_ms + 10, PCIE_SOC_GLOBAL_RESET, read & !GLOBAL_RESET_V),
            w(start_ms + 60, MHICTRL, MHICTRL_RESET),
        ]
    }

    #[test]
    fn resets_one_after_the_other_are_counted_and_each_is_checked() {
        // A kernel with the device-specific reset at open and release, then the agent's own.
        let writes: Vec<WriteRecord> = [wlan(0, 0x10), wlan(1000, 0x10), wlan(3000, 0x10)].concat();
        let c = check(Family::Wlan, &writes, 0x10);
        assert_eq!((c.ok, c.sequences), (true, 3), "{:?}", c.problems);

        let modem = [w(0, MHI_SOC_RESET_REQ, 1), w(2500, MHI_SOC_RESET_REQ, 1)];
        let c = check(Family::Modem, &modem, 0);
        assert_eq!((c.ok, c.sequences), (true, 2), "{:?}", c.problems);
        assert_eq!(check(Family::Wlan, &[], 0x10).sequences, 0);
    }

    #[test]
    fn a_wrong_second_reset_is_named_by_its_write_number() {
        let mut second = wlan(1000, 0x10);
        second[1].at_us = second[0].at_us + 2_000; // held 2 ms
        let writes: Vec<WriteRecord> = [wlan(0, 0x10), second].concat();
        let c = check(Family::Wlan, &writes, 0x10);
        assert!(!c.ok);
        assert_eq!(c.sequences, 1);
        assert!(
            c.problems[0].starts_with("assert held: 2000 us"),
            "{:?}",
            c.problems
        );

        // A stray write after a complete reset is no second reset.
        let writes: Vec<WriteRecord> = [&wlan(0, 0x10)[..], &[w(500, MHICTRL, 0)]].concat();
        let c = check(Family::Wlan, &writes, 0x10);
        assert_eq!(c.sequences, 1);
        assert_eq!(
            c.problems[0],
            "write 4: expected assert 0x3008 (the value read | 1), got 0x38 <- 0x0"
        );
    }
}
