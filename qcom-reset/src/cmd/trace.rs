//! `check` and `trace`: what this host allows, and the kernel's events as they come.

use qcom_reset::bdf::Bdf;
use qcom_reset::device::DEVICES;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::probes::{self, Attachment, Item, Tracer};
use serde::Serialize;

use super::check::{self, Level};
use super::cli::TraceArgs;
use super::kernel_release;

pub(super) fn check_cmd(host: &Host, json: bool) -> anyhow::Result<Exit> {
    let checks = check::run(host);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
    }
    let ok = check::tracing_possible(&checks);
    if !json {
        println!(
            "{}",
            if ok {
                "tracing can work on this host"
            } else {
                "tracing cannot work on this host (see FAIL lines)"
            }
        );
    }
    Ok(if ok { Exit::Ok } else { Exit::Unavailable })
}
pub(super) fn trace_cmd(host: &Host, a: TraceArgs) -> anyhow::Result<Exit> {
    let opts = probes::Options {
        trace_all: a.all,
        targets: DEVICES.iter().map(|d| (d.vendor, d.device)).collect(),
        ignore: Some(probes::loader::NsTgid::current()?),
        flavour: a.flavour,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Some(old) = check::kernel_too_old(&kernel_release()) {
        eprintln!("qcom-reset: cannot trace: {}", old.line());
        return Ok(Exit::Unavailable);
    }
    rt.block_on(async {
        let mut tracer = match Tracer::start(&opts) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("qcom-reset: cannot trace: {e:#}");
                for c in check::run(host).iter().filter(|c| c.level == Level::Fail) {
                    eprintln!("{}", c.line());
                }
                return Ok(Exit::Unavailable);
            }
        };
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                item = tracer.next() => print_item(&item?, a.json)?,
            }
        }
        Ok(Exit::Ok)
    })
}
/// A `trace --json` line that is not an event (an event's own `kind` is `attempt`, `release`
/// or `open`).
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Notice<'a> {
    /// The probes as attached (again when a module loads).
    Attach { attachments: &'a [Attachment] },
    /// Events lost, in total.
    Drops { ringbuf: u64, brackets: u64 },
    /// A record that could not be decoded.
    BadRecord {
        #[serde(serialize_with = "as_text")]
        error: &'a probes::events::DecodeError,
    },
    /// A card bound to vfio-pci.
    Bind { bdf: Bdf, driver: &'static str },
    /// The kernel's uevent socket overflowed.
    UeventsLost,
}

/// A value as its `Display` text.
fn as_text<S: serde::Serializer>(
    v: &&probes::events::DecodeError,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn print_item(item: &Item, json: bool) -> anyhow::Result<()> {
    let notice = |n: Notice<'_>| serde_json::to_string(&n).map(|l| println!("{l}"));
    match (item, json) {
        (Item::Event { event, .. }, true) => println!("{}", serde_json::to_string(event)?),
        (Item::Event { event, .. }, false) => println!("{}", event.line()),
        (Item::Attached(attachments), true) => notice(Notice::Attach { attachments })?,
        (Item::Attached(a), false) => {
            for x in a {
                match x.flavour {
                    Some(f) => println!(
                        "attach  {:<30} {}{}",
                        x.function.symbol(),
                        qcom_reset::probes::events::flavour_str(f),
                        x.note
                            .as_ref()
                            .map(|n| format!(" (after {n})"))
                            .unwrap_or_default()
                    ),
                    None => println!(
                        "attach  {:<30} NOT ATTACHED: {}",
                        x.function.symbol(),
                        x.note.as_deref().unwrap_or("?")
                    ),
                }
            }
        }
        (Item::Drops { ringbuf, brackets }, true) => notice(Notice::Drops {
            ringbuf: *ringbuf,
            brackets: *brackets,
        })?,
        (Item::Drops { ringbuf, brackets }, false) => {
            println!(
                "drops   ring buffer {ringbuf}, in-flight tables {brackets} (events were lost)"
            );
        }
        (Item::Bad(error), true) => notice(Notice::BadRecord { error })?,
        (Item::Bad(why), false) => println!("bad     {why}"),
        (Item::Bound(bdf), true) => notice(Notice::Bind {
            bdf: *bdf,
            driver: "vfio-pci",
        })?,
        (Item::Bound(bdf), false) => println!("bind    {bdf} vfio-pci"),
        (Item::UeventsLost, true) => notice(Notice::UeventsLost)?,
        (Item::UeventsLost, false) => println!("lost    kernel uevents (socket overflow)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab and users' scripts read these lines by `kind` and field names.
    #[test]
    fn notices_are_tagged_lines_with_their_fields() {
        let line = |n: Notice<'_>| serde_json::to_value(&n).unwrap();
        assert_eq!(
            line(Notice::Bind {
                bdf: "0000:03:00.0".parse().unwrap(),
                driver: "vfio-pci"
            }),
            serde_json::json!({"kind": "bind", "bdf": "0000:03:00.0", "driver": "vfio-pci"})
        );
        assert_eq!(
            line(Notice::BadRecord {
                error: &probes::events::DecodeError::Abi(9)
            })["error"],
            probes::events::DecodeError::Abi(9).to_string()
        );
        assert_eq!(
            line(Notice::Drops {
                ringbuf: 2,
                brackets: 0
            }),
            serde_json::json!({"kind": "drops", "ringbuf": 2, "brackets": 0})
        );
        assert_eq!(
            line(Notice::UeventsLost),
            serde_json::json!({"kind": "uevents-lost"})
        );
    }
}
