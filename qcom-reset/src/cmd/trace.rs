//! `check` and `trace`: what this host allows, and the kernel's events as they come.

use qcom_reset::device::DEVICES;
use qcom_reset::exit::Exit;
use qcom_reset::host::Host;
use qcom_reset::probes::{self, Item, Tracer};

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
fn print_item(item: &Item, json: bool) -> anyhow::Result<()> {
    match (item, json) {
        (Item::Event { event, .. }, true) => println!("{}", serde_json::to_string(event)?),
        (Item::Event { event, .. }, false) => println!("{}", event.line()),
        (Item::Attached(a), true) => println!(
            "{}",
            serde_json::json!({"kind": "attach", "attachments": a})
        ),
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
        (Item::Drops { ringbuf, brackets }, true) => println!(
            "{}",
            serde_json::json!({"kind": "drops", "ringbuf": ringbuf, "brackets": brackets})
        ),
        (Item::Drops { ringbuf, brackets }, false) => {
            println!(
                "drops   ring buffer {ringbuf}, in-flight tables {brackets} (events were lost)"
            );
        }
        (Item::Bad(why), true) => println!(
            "{}",
            serde_json::json!({"kind": "bad-record", "error": why.to_string()})
        ),
        (Item::Bad(why), false) => println!("bad     {why}"),
        (Item::Bound(bdf), true) => println!(
            "{}",
            serde_json::json!({"kind": "bind", "bdf": bdf.to_string(), "driver": "vfio-pci"})
        ),
        (Item::Bound(bdf), false) => println!("bind    {bdf} vfio-pci"),
        (Item::UeventsLost, true) => println!("{}", serde_json::json!({"kind": "uevents-lost"})),
        (Item::UeventsLost, false) => println!("lost    kernel uevents (socket overflow)"),
    }
    Ok(())
}
