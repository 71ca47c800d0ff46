//! The kernel's own reset where it has one (`device_specific`, the 2026 quirk): made the method
//! for this one reset, the list it replaces kept in the crash record meanwhile.
use tracing::warn;

use super::Target;
use super::guard::Session;
use super::step::Step;
use crate::{Error, Result};

/// Runs the kernel's `device_specific` reset, making it the method used for this one reset
/// (the list it replaces is in the crash record meanwhile). The reset's own error comes first;
/// one putting the list back is logged and left to the restore.
pub(super) fn kernel_reset(session: &mut Session, t: &Target) -> Result<()> {
    if let Some(methods) = method_swap(t.reset_methods.as_deref().unwrap_or_default()) {
        session.swap_reset_method(methods)?;
    }
    let r = t.dev.write("reset", "1").map_err(|e| match e {
        Error::SysfsWrite { err, .. } => Error::KernelReset { bdf: t.bdf, err },
        e => e,
    });
    if r.is_ok() {
        session.took(Step::KernelReset);
    }
    match (r, session.unswap_reset_method()) {
        (Err(e), Err(back)) => {
            warn!(bdf = %t.bdf, "reset_method not put back yet: {back}");
            Err(e)
        }
        (r, back) => r.and(back),
    }
}

/// When `device_specific` is not the first method, the kernel would try the others first: the
/// list to put back after making it the only one for this reset.
pub(super) fn method_swap(methods: &[String]) -> Option<String> {
    (methods.first().map(String::as_str) != Some("device_specific")).then(|| methods.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specific_is_made_first_only_when_it_is_not() {
        let m = |v: &[&str]| {
            v.iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            method_swap(&m(&["bus", "device_specific"])),
            Some("bus device_specific".into())
        );
        assert_eq!(method_swap(&m(&["device_specific", "bus"])), None);
    }
}
