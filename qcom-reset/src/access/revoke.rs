//! A mapped BAR the kernel can take away. With `CONFIG_IO_STRICT_DEVMEM` (Debian's kernels have
//! it) a driver or VFIO user that claims the BAR's region (vfio-pci does at QEMU's first BAR
//! access, a host driver at probe) revokes every sysfs mapping of it (`revoke_iomem`), and the
//! next access through ours raises SIGBUS, which would kill the process mid-session, its card
//! unrestored. A SIGBUS inside a registered mapping instead puts an anonymous page of all-ones
//! bytes where the faulting page was (the access then reads 0xffffffff, what a card off the bus
//! reads, which every reader handles; writes land in that page, never on a card) and marks the
//! mapping revoked. A fault anywhere else gets the handler that was there before (Rust's own,
//! or the default: the process dies as it would have).
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Mappings registered at once: a session maps one BAR, the agent runs a session per card.
const SLOTS: usize = 64;

static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static REVOKED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static TAKEN: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours, for faults that are not in a registered mapping.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered mapping; unregistered on drop (before the mapping itself goes).
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

impl Registration {
    /// Whether the kernel took the mapping away since it was registered.
    pub fn revoked(&self) -> bool {
        REVOKED[self.slot].load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        LENS[self.slot].store(0, Ordering::Release);
        STARTS[self.slot].store(0, Ordering::Release);
        REVOKED[self.slot].store(false, Ordering::Release);
        TAKEN[self.slot].store(false, Ordering::Release);
    }
}

/// Registers `len` bytes at `start`; None when every slot is in use (the caller refuses to map:
/// an unprotected mapping is not used).
pub fn register(start: *mut u8, len: usize) -> Option<Registration> {
    INSTALL.call_once(install);
    let slot = (0..SLOTS).find(|&i| {
        TAKEN[i]
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })?;
    REVOKED[slot].store(false, Ordering::Release);
    STARTS[slot].store(start as usize, Ordering::Release);
    LENS[slot].store(len, Ordering::Release);
    Some(Registration { slot })
}

fn install() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Release);
    }
    // SAFETY: a zeroed sigaction is a valid empty one; the handler has the SA_SIGINFO signature;
    // PREVIOUS is written once, here, before the handler that reads it is installed.
    unsafe {
        let mut ours: libc::sigaction = std::mem::zeroed();
        ours.sa_sigaction = on_sigbus as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut ours.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0 {
            PREVIOUS = Some(old);
        }
        libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Acquire);
    for i in 0..SLOTS {
        let (start, len) = (
            STARTS[i].load(Ordering::Acquire),
            LENS[i].load(Ordering::Acquire),
        );
        if len == 0 || addr < start || addr >= start + len {
            continue;
        }
        let at = (addr & !(page - 1)) as *mut libc::c_void;
        // SAFETY: `at` is a page of a mapping this process made and registered; MAP_FIXED
        // replaces that page only. mmap and memset are async-signal-safe.
        let ok = unsafe {
            let p = libc::mmap(
                at,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            p != libc::MAP_FAILED && {
                libc::memset(p, 0xff, page);
                true
            }
        };
        if ok {
            REVOKED[i].store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): the previous action, as if we were not
    // here; returning re-runs the faulting access under it.
    // SAFETY: PREVIOUS was set before this handler was installed and is never written again.
    unsafe {
        let previous = (*std::ptr::addr_of!(PREVIOUS)).unwrap_or_else(|| {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            dfl
        });
        libc::sigaction(libc::SIGBUS, &previous, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file mapping whose file is truncated faults with SIGBUS beyond the new end, as a
    /// revoked BAR mapping does: the registered mapping reads all-ones instead and says so.
    /// Three mappings, the fault in the one between the others: only that one is revoked.
    #[test]
    fn a_fault_in_a_registered_mapping_reads_all_ones_and_marks_it_revoked() {
        let page = PAGE.load(Ordering::Acquire).max(4096);
        let mut mapped: Vec<_> = (0..3)
            .map(|_| {
                let file = tempfile::tempfile().unwrap();
                file.set_len(2 * page as u64).unwrap();
                let map = memmap2::MmapOptions::new()
                    .len(2 * page)
                    .map_raw(&file)
                    .unwrap();
                (file, map)
            })
            .collect();
        // Registered lowest address first, so a range check that is too wide meets a wrong
        // mapping before the faulting one, the middle one.
        mapped.sort_by_key(|(_, map)| map.as_ptr() as usize);
        let regs: Vec<Registration> = mapped
            .iter()
            .map(|(_, map)| register(map.as_mut_ptr(), map.len()).unwrap())
            .collect();
        let (file, map) = &mapped[1];
        let at = |off: usize| {
            // SAFETY: within the mapping, aligned.
            unsafe { std::ptr::read_volatile(map.as_ptr().add(off).cast::<u32>()) }
        };
        // Inside the page, not at its start: the replacement must be the faulting page's.
        assert_eq!(at(page + 8), 0);
        assert!(regs.iter().all(|r| !r.revoked()));
        file.set_len(0).unwrap();
        assert_eq!(
            at(page + 8),
            0xffff_ffff,
            "the truncated page reads all-ones"
        );
        // The mapping's first byte is inside it too.
        assert_eq!(at(0), 0xffff_ffff);
        let revoked: Vec<bool> = regs.iter().map(Registration::revoked).collect();
        assert_eq!(revoked, [false, true, false], "only the faulting mapping");
        drop(regs);
        let again = register(map.as_mut_ptr(), map.len()).unwrap();
        assert!(!again.revoked(), "a slot starts clean");
    }
}
