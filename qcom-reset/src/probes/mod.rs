//! The eBPF side as the agent sees it: load and attach ([`loader`]), kernel layouts from BTF
//! ([`layout`]), record decoding ([`events`]), and [`Tracer`], the async stream of items.
pub mod events;
pub mod layout;
pub mod loader;
pub mod uevents;

use std::collections::VecDeque;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use events::TraceEvent;
pub use loader::{Attachment, FlavourChoice, Options, Probes};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, so differences with an event's
/// `ktime_ns` are latencies.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What the tracer hands on.
#[derive(Clone, Debug)]
pub enum Item {
    /// A record, and when its batch was taken from the ring buffer ([`mono_ns`]).
    Event {
        /// The event.
        event: TraceEvent,
        /// When its batch was taken.
        taken_ns: u64,
    },
    /// New ring-buffer or bracket-table drops since the last report (totals in the fields).
    Drops {
        /// Ring-buffer drops in total.
        ringbuf: u64,
        /// Bracket-table drops in total.
        brackets: u64,
    },
    /// The attachment table changed (the vfio_pci_core module appeared).
    Attached(Vec<Attachment>),
    /// A record that could not be decoded.
    Bad(events::DecodeError),
    /// Kernel uevents were lost (socket overflow): a bind may have been missed.
    UeventsLost,
    /// The kernel bound this device to vfio-pci (a `bind` uevent).
    Bound(crate::bdf::Bdf),
}

/// Without kernel uevents (an agent in its own network namespace), how often the module watch
/// and the drop counters are looked at instead.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The probes, their ring buffer and uevents, as one stream of items.
pub struct Tracer {
    probes: Probes,
    events: AsyncFd<RingBuf<MapData>>,
    logger: Option<LogFd>,
    queue: VecDeque<Item>,
    drops: (u64, u64),
    /// Records were read since the drop counters were: look at them once the batch is handed
    /// over (their map reads are not between a release and the agent).
    drops_due: bool,
    /// Binds and module loads/unloads: with these nothing is polled while idle.
    uevents: Option<uevents::Uevents>,
    /// Only without uevents: the module watch and drop counters on a timer.
    tick: Option<tokio::time::Interval>,
    /// vfio_pci_core announced but not live yet: look again shortly (never armed while idle).
    settle: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Looks since the module was announced; the wait ends after [`SETTLE_TRIES`].
    settle_tries: u32,
}

/// 10 s of a module stuck in its init: then the next uevent or a rescan tries again.
const SETTLE_TRIES: u32 = 500;

/// How often a loading vfio_pci_core is looked at until it is live.
const SETTLE: Duration = Duration::from_millis(20);

impl Tracer {
    /// Loads and attaches everything; fails with every reason when no reset probe attached.
    pub fn start(opts: &Options) -> anyhow::Result<Tracer> {
        let mut probes = Probes::open(opts)?;
        // SAFETY: the ring buffers own their map fds and keep them open, unchanged, until dropped,
        // which happens only when the AsyncFd is dropped.
        let logger = probes
            .take_logger()
            .and_then(|l| unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }.ok());
        probes.attach_reset_probes(opts.flavour);
        probes.sync_vfio();
        if probes.attachments.iter().all(|a| a.flavour.is_none()) {
            let why: Vec<String> = probes
                .attachments
                .iter()
                .filter_map(|a| {
                    a.note
                        .as_ref()
                        .map(|n| format!("{}: {n}", a.function.symbol()))
                })
                .collect();
            anyhow::bail!(
                "no probe could be attached; run `qcom-reset check` for the fix. First reason: {}",
                why.first().map_or("unknown", String::as_str)
            );
        }
        // SAFETY: as for the logger above.
        let events =
            unsafe { AsyncFd::register_with_interest(probes.take_events()?, Interest::READABLE) }
                .map_err(|e| {
                anyhow::anyhow!(
                    "registering the event ring buffer with tokio: {}",
                    e.into_parts().1
                )
            })?;
        let uevents = match uevents::Uevents::open() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(
                    "no kernel uevents ({e}): binds to vfio-pci are not seen (targets are reset at their first release), and vfio_pci_core is watched by polling once a second; run in the host's network namespace"
                );
                None
            }
        };
        let tick = uevents.is_none().then(|| {
            let mut t = tokio::time::interval(HOUSEKEEPING);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let queue = VecDeque::from([Item::Attached(probes.attachments.clone())]);
        Ok(Tracer {
            probes,
            events,
            logger,
            queue,
            drops: (0, 0),
            drops_due: false,
            uevents,
            tick,
            settle: None,
            settle_tries: 0,
        })
    }

    fn sync_vfio(&mut self) {
        if self.probes.sync_vfio() {
            self.queue
                .push_back(Item::Attached(self.probes.attachments.clone()));
        }
        let coming = self.probes.vfio_coming();
        self.settle_tries = if coming { self.settle_tries + 1 } else { 0 };
        if coming && self.settle_tries == SETTLE_TRIES {
            tracing::warn!(
                "vfio_pci_core has been loading for 10 s; its probes attach at its next uevent"
            );
        }
        self.settle = (coming && self.settle_tries < SETTLE_TRIES)
            .then(|| Box::pin(tokio::time::sleep(SETTLE)));
    }

    fn on_uevent(&mut self, u: uevents::Uevent) {
        use uevents::Uevent::*;
        match u {
            VfioBind(bdf) => self.queue.push_back(Item::Bound(bdf)),
            ModuleAdded(m) | ModuleRemoved(m) if m == layout::VFIO_MODULE => self.sync_vfio(),
            ModuleAdded(_) | ModuleRemoved(_) => {}
            Lost => {
                self.sync_vfio();
                self.queue.push_back(Item::UeventsLost);
            }
        }
    }

    fn housekeeping(&mut self) {
        self.sync_vfio();
        self.check_drops();
    }

    /// Drop counters only move when records were being produced, so they are read after each
    /// ring-buffer batch has been handed over, not on a timer.
    fn check_drops(&mut self) {
        let d = self.probes.drops();
        if d != self.drops {
            self.drops = d;
            self.queue.push_back(Item::Drops {
                ringbuf: d.0,
                brackets: d.1,
            });
        }
    }

    /// The next item; cancel-safe (items stay queued).
    pub async fn next(&mut self) -> anyhow::Result<Item> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(item);
            }
            if self.drops_due {
                // On one thread: the agent takes the batch just handed over (and starts its
                // resets) before the counters' map reads.
                tokio::task::yield_now().await;
                self.drops_due = false;
                self.check_drops();
                continue;
            }
            tokio::select! {
                guard = self.events.readable_mut() => {
                    let mut guard = guard?;
                    let taken_ns = mono_ns();
                    while let Some(rec) = guard.get_inner_mut().next() {
                        self.queue.push_back(match events::decode(&rec) {
                            Ok(event) => Item::Event { event, taken_ns },
                            Err(e) => Item::Bad(e),
                        });
                    }
                    guard.clear_ready();
                    self.drops_due = true;
                }
                u = next_uevent(&mut self.uevents) => match u {
                    Ok(u) => self.on_uevent(u),
                    Err(e) => {
                        tracing::warn!("kernel uevent socket failed ({e}); polling vfio_pci_core instead");
                        self.uevents = None;
                        let mut t = tokio::time::interval(HOUSEKEEPING);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        self.tick = Some(t);
                    }
                },
                guard = logger_readable(&mut self.logger) => {
                    let mut guard = guard?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                _ = async { self.tick.as_mut().expect("guarded").tick().await }, if self.tick.is_some() => self.housekeeping(),
                _ = async { self.settle.as_mut().expect("guarded").await }, if self.settle.is_some() => self.sync_vfio(),
            }
        }
    }
}

async fn next_uevent(u: &mut Option<uevents::Uevents>) -> std::io::Result<uevents::Uevent> {
    match u {
        Some(u) => u.next().await,
        None => std::future::pending().await,
    }
}

type LogFd = AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>;

/// eBPF-side log records (aya-log), forwarded to `log` and from there to tracing.
async fn logger_readable(
    logger: &mut Option<LogFd>,
) -> std::io::Result<
    tokio::io::unix::AsyncFdReadyMutGuard<'_, aya_log::EbpfLogger<&'static dyn log::Log>>,
> {
    match logger {
        Some(l) => l.readable_mut().await,
        None => std::future::pending().await,
    }
}
