//! `cargo xtask licenses`: every package in the dependency graph (the eBPF side included) must be
//! usable under licences that fit ours: permissive ones, plus GPL-2.0 for the eBPF programs the
//! kernel loads. Expressions are evaluated with the `spdx` crate, as cargo-deny does.
use anyhow::{Context as _, bail};

use crate::{cargo, toolchain};

/// Licences a dependency may be used under.
const ALLOWED: [&str; 13] = [
    "MIT",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "0BSD",
    "CC0-1.0",
    "Unlicense",
    "BSL-1.0",
    "Unicode-3.0",
    "GPL-2.0",
];

/// Packages allowed under one more licence, each with the reason (cargo-deny's `exceptions`).
/// btf-rs (BTF parsing for the kernel struct layouts) is LGPL-2.1-or-later: shipping it
/// statically linked is compliant because the complete corresponding source of qcom-reset is
/// public, so a user can relink against a modified btf-rs (LGPL-2.1 §6a).
const EXCEPTIONS: [(&str, &str); 2] = [
    ("btf-rs", "LGPL-2.1-or-later"),
    ("btf-rs-derive", "LGPL-2.1-or-later"),
];

fn allowed(req: &spdx::LicenseReq) -> bool {
    let text = req.to_string();
    ALLOWED
        .iter()
        .any(|a| text == *a || text.trim_end_matches('+') == *a || text.replace("-only", "") == *a)
}

pub fn check() -> anyhow::Result<()> {
    toolchain::ensure_pinned()?;
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut bad = Vec::new();
    let mut n = 0;
    for p in meta["packages"].as_array().context("no packages")? {
        n += 1;
        let name = format!("{} {}", p["name"].as_str().unwrap_or("?"), p["version"]);
        let Some(lic) = p["license"].as_str() else {
            bad.push(format!("{name}: no SPDX licence in its manifest"));
            continue;
        };
        let crate_name = p["name"].as_str().unwrap_or("");
        if EXCEPTIONS.contains(&(crate_name, lic)) {
            continue;
        }
        match spdx::Expression::parse_mode(lic, spdx::ParseMode::LAX) {
            Ok(e) if e.evaluate(allowed) => {}
            Ok(_) => bad.push(format!("{name}: {lic}")),
            Err(err) => bad.push(format!("{name}: unparsable licence {lic:?}: {err}")),
        }
    }
    println!("licenses: {n} packages checked, {} not allowed", bad.len());
    for b in &bad {
        println!("  {b}");
    }
    if !bad.is_empty() {
        bail!("dependencies under licences outside the allowed list (xtask/src/licenses.rs)");
    }
    Ok(())
}
