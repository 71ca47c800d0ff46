//! Decoding of ring-buffer records into the documented event schema (docs/events.md).
use bytes::Buf;
use qcom_reset_ebpf::{
    BDF_LEN, COMM_LEN, EVENT_ABI_VERSION, Event, EventKind, Flavour, Func, MAX_ATTEMPTS,
    NEEDS_RESET_UNKNOWN,
};
use serde::{Serialize, Serializer};

use crate::bdf::{Bdf, BdfError};

/// Version of the JSON schema in docs/events.md.
pub const SCHEMA_VERSION: u32 = 2;

/// A function as its kernel symbol (the schema's text); the value stays typed until then.
pub(crate) fn symbol<S: Serializer>(f: &Func, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.symbol())
}

/// A PCI ID as the schema writes it: four lowercase hex digits, as sysfs and lspci do.
fn hex4<S: Serializer>(id: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{id:04x}"))
}

/// How a probe was attached, by the schema's name.
fn flavour_name<S: Serializer>(f: &Flavour, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(flavour_str(*f))
}

/// How a probe flavour is written in traces and the attachment table.
pub fn flavour_str(f: Flavour) -> &'static str {
    match f {
        Flavour::Kprobe => "kprobe",
        Flavour::Fentry => "fentry",
    }
}

/// A reset attempt as `trace --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptOut {
    /// The kernel function.
    #[serde(serialize_with = "symbol")]
    pub function: Func,
    /// Its return value.
    pub ret: i32,
    /// The return value's errno name, when it is one.
    pub errno: Option<&'static str>,
    /// How long the call took.
    pub duration_ns: u64,
}

/// What a trace event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A reset call returned.
    Attempt,
    /// vfio-pci let the device go (`vfio_pci_core_disable`).
    Release,
    /// vfio-pci opened the device for a user (`vfio_pci_core_enable`).
    Open,
}

impl Kind {
    /// The schema's name (also the metrics' `kind` label).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Attempt => "attempt",
            Kind::Release => "release",
            Kind::Open => "open",
        }
    }
}

/// One probe record, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// The event layout's version.
    pub schema: u32,
    /// What happened.
    pub kind: Kind,
    /// The probe that saw it.
    #[serde(serialize_with = "flavour_name")]
    pub flavour: Flavour,
    /// The kernel function.
    #[serde(serialize_with = "symbol")]
    pub function: Func,
    /// The device.
    pub bdf: Bdf,
    /// Its vendor ID.
    #[serde(serialize_with = "hex4")]
    pub vendor: u16,
    /// Its device ID.
    #[serde(serialize_with = "hex4")]
    pub device: u16,
    /// The function's return value.
    pub ret: i32,
    /// The return value's errno name, when it is one.
    pub errno: Option<&'static str>,
    /// How long the call took.
    pub duration_ns: u64,
    /// CLOCK_MONOTONIC of the function's entry (bpf_ktime_get_ns).
    pub ktime_ns: u64,
    /// The calling thread.
    pub pid: u32,
    /// The calling process.
    pub tgid: u32,
    /// The calling process's command name.
    pub comm: String,
    /// Release/open only: the reset calls made inside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptOut>>,
    /// Attempts seen, including any beyond the kept list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_seen: Option<u8>,
    /// Release only: `vdev->needs_reset` when the module's BTF made it readable. Informational:
    /// the kernel clears it after a bus reset too, which does not reset these cards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs_reset: Option<bool>,
    /// Release/open: which kind of kernel reset returned 0 inside the bracket, strongest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_reset: Option<KernelReset>,
    /// Attempt only: made inside a VFIO open or release of the same device, whose own event
    /// carries it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inside: Option<Kind>,
    /// Release/open: the device was left without a real reset, i.e. no non-probe
    /// `pci_dev_specific_reset` returned 0 inside the bracket (`kernel_reset` is not
    /// `device-specific`). A bus reset's 0 means only that config space answers again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_unreset: Option<bool>,
}

/// The strongest kernel reset that returned 0 inside an open/release bracket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelReset {
    /// `pci_dev_specific_reset` (the 2026 quirk): the only kernel reset that resets these cards.
    DeviceSpecific,
    /// A secondary bus reset (`pci_reset_bus_function`, `pci_reset_bus`): the SoC keeps running.
    Bus,
    /// A reset call returned 0 but no method probe saw which one ran.
    Unidentified,
    /// No reset call returned 0.
    None,
}

impl KernelReset {
    fn from_attempts(ok: impl Iterator<Item = Func> + Clone) -> KernelReset {
        let any = |want: &[Func]| ok.clone().any(|f| want.contains(&f));
        if any(&[Func::PciDevSpecificReset]) {
            KernelReset::DeviceSpecific
        } else if any(&[Func::PciResetBusFunction, Func::PciResetBus]) {
            KernelReset::Bus
        } else if ok.clone().any(resets_device) {
            KernelReset::Unidentified
        } else {
            KernelReset::None
        }
    }

    /// The kernel function's name.
    pub fn name(self) -> &'static str {
        match self {
            KernelReset::DeviceSpecific => "device_specific",
            KernelReset::Bus => "bus reset (SBR does not reset these cards)",
            KernelReset::Unidentified => "a reset of unidentified method",
            KernelReset::None => "no reset",
        }
    }
}

/// A probe record that cannot be decoded.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "event of {0} bytes, expected {1}: the eBPF object and the agent are from different builds"
    )]
    /// The record has another size than this build's event.
    Size(usize, usize),
    #[error(
        "event ABI {0}, expected {EVENT_ABI_VERSION}: the eBPF object and the agent are from different builds"
    )]
    /// The record has another ABI version.
    Abi(u8),
    /// A field holds a value this build does not know.
    #[error("unknown {0} {1} in event")]
    Unknown(&'static str, u8),
    /// The record's device address is malformed.
    #[error("the event's device address: {0}")]
    Bdf(#[from] BdfError),
}

/// The errno name of a negative return value, for the errnos resets return.
pub fn errno_name(ret: i32) -> Option<&'static str> {
    Some(match -ret {
        1 => "EPERM",
        5 => "EIO",
        11 => "EAGAIN",
        16 => "EBUSY",
        19 => "ENODEV",
        22 => "EINVAL",
        25 => "ENOTTY",
        110 => "ETIMEDOUT",
        _ if ret < 0 => "E?",
        _ => return None,
    })
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn func(v: u8) -> Result<Func, DecodeError> {
    Func::from_u8(v).ok_or(DecodeError::Unknown("function", v))
}

/// Resets that, when they return 0, leave the device reset.
fn resets_device(f: Func) -> bool {
    !matches!(f, Func::VfioPciCoreEnable | Func::VfioPciCoreDisable)
}

/// Decodes one ring-buffer record.
pub fn decode(mut b: &[u8]) -> Result<TraceEvent, DecodeError> {
    if b.len() != size_of::<Event>() {
        return Err(DecodeError::Size(b.len(), size_of::<Event>()));
    }
    let abi = b.get_u8();
    if abi != EVENT_ABI_VERSION {
        return Err(DecodeError::Abi(abi));
    }
    let kind = kind(b.get_u8())?;
    let flavour = flavour(b.get_u8())?;
    let function = func(b.get_u8())?;
    let needs_reset = b.get_u8();
    let n_attempts = b.get_u8() as usize;
    let n_seen = b.get_u8();
    let inside = bracket(b.get_u8())?;
    let ret = b.get_i32_le();
    let vendor = b.get_u16_le();
    let device = b.get_u16_le();
    let pid = b.get_u32_le();
    let tgid = b.get_u32_le();
    let ktime_ns = b.get_u64_le();
    let duration_ns = b.get_u64_le();
    let comm = cstr(&b[..COMM_LEN]);
    b.advance(COMM_LEN);
    let bdf: Bdf = cstr(&b[..BDF_LEN]).parse()?;
    b.advance(BDF_LEN);
    let attempts = attempts(&mut b, n_attempts)?;
    let mut ev = TraceEvent {
        schema: SCHEMA_VERSION,
        kind,
        flavour,
        function,
        bdf,
        vendor,
        device,
        ret,
        errno: errno_name(ret),
        duration_ns,
        ktime_ns,
        pid,
        tgid,
        comm,
        attempts: None,
        attempts_seen: None,
        needs_reset: None,
        kernel_reset: None,
        inside: None,
        left_unreset: None,
    };
    if ev.kind == Kind::Attempt {
        ev.inside = inside;
    } else {
        ev.summarize(attempts, n_seen, needs_reset);
    }
    Ok(ev)
}

fn kind(k: u8) -> Result<Kind, DecodeError> {
    match k {
        k if k == EventKind::Attempt as u8 => Ok(Kind::Attempt),
        k if k == EventKind::Release as u8 => Ok(Kind::Release),
        k if k == EventKind::Open as u8 => Ok(Kind::Open),
        k => Err(DecodeError::Unknown("kind", k)),
    }
}

fn flavour(f: u8) -> Result<Flavour, DecodeError> {
    match f {
        f if f == Flavour::Kprobe as u8 => Ok(Flavour::Kprobe),
        f if f == Flavour::Fentry as u8 => Ok(Flavour::Fentry),
        f => Err(DecodeError::Unknown("flavour", f)),
    }
}

/// The VFIO open or release an attempt ran inside, if any.
fn bracket(f: u8) -> Result<Option<Kind>, DecodeError> {
    match f {
        0 => Ok(None),
        f if f == Func::VfioPciCoreEnable as u8 => Ok(Some(Kind::Open)),
        f if f == Func::VfioPciCoreDisable as u8 => Ok(Some(Kind::Release)),
        f => Err(DecodeError::Unknown("bracket", f)),
    }
}

/// The bracket's attempt slots: all are read (the record's size is fixed), the first `n` kept.
fn attempts(b: &mut &[u8], n: usize) -> Result<Vec<(Func, i32, u64)>, DecodeError> {
    let mut attempts = Vec::new();
    for i in 0..MAX_ATTEMPTS {
        let f = b.get_u8();
        b.advance(3);
        let r = b.get_i32_le();
        let d = b.get_u64_le();
        if i < n {
            attempts.push((func(f)?, r, d));
        }
    }
    Ok(attempts)
}

impl TraceEvent {
    /// An open's or release's summary of the reset attempts inside it: which reset counts, and
    /// what vfio-pci's `needs_reset` said (releases only).
    fn summarize(&mut self, attempts: Vec<(Func, i32, u64)>, n_seen: u8, needs_reset: u8) {
        let kernel = KernelReset::from_attempts(
            attempts
                .iter()
                .filter(|(_, r, _)| *r == 0)
                .map(|(f, _, _)| *f),
        );
        self.kernel_reset = Some(kernel);
        self.left_unreset = Some(kernel != KernelReset::DeviceSpecific);
        self.attempts_seen = Some(n_seen);
        self.attempts = Some(
            attempts
                .into_iter()
                .map(|(f, r, d)| AttemptOut {
                    function: f,
                    ret: r,
                    errno: errno_name(r),
                    duration_ns: d,
                })
                .collect(),
        );
        self.needs_reset = (self.kind == Kind::Release && needs_reset != NEEDS_RESET_UNKNOWN)
            .then_some(needs_reset != 0);
    }
}

impl TraceEvent {
    /// One human-readable line.
    pub fn line(&self) -> String {
        let head = format!(
            "{} {} {:04x}:{:04x} {}",
            self.bdf,
            self.function.symbol(),
            self.vendor,
            self.device,
            flavour_str(self.flavour)
        );
        let who = format!("pid {} ({})", self.tgid, self.comm);
        let ret = |r: i32, e: Option<&str>| match e {
            Some(e) => format!("{r} ({e})"),
            None => r.to_string(),
        };
        match self.kind {
            Kind::Attempt => format!(
                "reset   {head} ret={} in {:.3} ms, {who}",
                ret(self.ret, self.errno),
                self.duration_ns as f64 / 1e6
            ),
            Kind::Release | Kind::Open => {
                let tries: Vec<String> = self
                    .attempts
                    .iter()
                    .flatten()
                    .map(|a| format!("{}={}", a.function.symbol(), ret(a.ret, a.errno)))
                    .collect();
                let by = self.kernel_reset.unwrap_or(KernelReset::None).name();
                let verdict = match self.left_unreset {
                    Some(true) => format!("LEFT UNRESET (kernel: {by})"),
                    _ => format!("reset by the kernel's {by}"),
                };
                format!(
                    "{:<7} {head} [{}] {verdict}, {who}",
                    if self.kind == Kind::Release {
                        "release"
                    } else {
                        "open"
                    },
                    if tries.is_empty() {
                        "no reset attempted".to_string()
                    } else {
                        tries.join(", ")
                    }
                )
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::BufMut;

    /// Encodes an event exactly as the eBPF side lays it out.
    pub fn encode(
        kind: EventKind,
        f: Func,
        ret: i32,
        needs_reset: u8,
        attempts: &[(Func, i32)],
    ) -> Vec<u8> {
        let mut b = Vec::with_capacity(size_of::<Event>());
        b.put_u8(EVENT_ABI_VERSION);
        b.put_u8(kind as u8);
        b.put_u8(Flavour::Kprobe as u8);
        b.put_u8(f as u8);
        b.put_u8(needs_reset);
        b.put_u8(attempts.len() as u8);
        b.put_u8(attempts.len() as u8);
        b.put_u8(0);
        b.put_i32_le(ret);
        b.put_u16_le(0x17cb);
        b.put_u16_le(0x1103);
        b.put_u32_le(42);
        b.put_u32_le(41);
        b.put_u64_le(1_000);
        b.put_u64_le(2_500_000);
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"qemu");
        b.put_slice(&comm);
        let mut bdf = [0u8; BDF_LEN];
        bdf[..12].copy_from_slice(b"0000:03:00.0");
        b.put_slice(&bdf);
        for i in 0..MAX_ATTEMPTS {
            let (af, ar) = attempts.get(i).copied().unwrap_or((Func::PciResetBus, 0));
            b.put_u8(if i < attempts.len() { af as u8 } else { 0 });
            b.put_slice(&[0; 3]);
            b.put_i32_le(if i < attempts.len() { ar } else { 0 });
            b.put_u64_le(1000);
        }
        assert_eq!(
            b.len(),
            size_of::<Event>(),
            "encoder matches the ABI struct"
        );
        b
    }

    /// The bracket byte: an attempt made inside a VFIO open or release says so; anything but
    /// those two functions is refused, not guessed.
    #[test]
    fn decodes_the_bracket_an_attempt_was_made_in() {
        let attempt = |bracket: u8| {
            let mut b = encode(
                EventKind::Attempt,
                Func::PciTryResetFunction,
                0,
                NEEDS_RESET_UNKNOWN,
                &[],
            );
            b[7] = bracket;
            decode(&b)
        };
        assert_eq!(attempt(0).unwrap().inside, None);
        let open = Func::VfioPciCoreEnable as u8;
        assert_eq!(attempt(open).unwrap().inside, Some(Kind::Open));
        let release = Func::VfioPciCoreDisable as u8;
        assert_eq!(attempt(release).unwrap().inside, Some(Kind::Release));
        assert!(matches!(
            attempt(Func::PciResetBus as u8),
            Err(DecodeError::Unknown("bracket", _))
        ));
    }

    #[test]
    fn decodes_an_attempt() {
        let e = decode(&encode(
            EventKind::Attempt,
            Func::PciResetFunction,
            -25,
            NEEDS_RESET_UNKNOWN,
            &[],
        ))
        .unwrap();
        assert_eq!(
            (e.kind, e.function, e.ret, e.errno),
            (Kind::Attempt, Func::PciResetFunction, -25, Some("ENOTTY"))
        );
        assert_eq!(
            (e.bdf.to_string(), e.vendor, e.device, e.comm.as_str()),
            ("0000:03:00.0".to_string(), 0x17cb, 0x1103, "qemu")
        );
        assert_eq!(e.attempts, None);
        assert!(e.line().contains("ret=-25 (ENOTTY) in 2.500 ms"));
    }

    fn release(needs_reset: u8, attempts: &[(Func, i32)]) -> TraceEvent {
        decode(&encode(
            EventKind::Release,
            Func::VfioPciCoreDisable,
            0,
            needs_reset,
            attempts,
        ))
        .unwrap()
    }

    /// (attempts inside the bracket, needs_reset, kernel reset named, left unreset)
    type Case = (&'static [(Func, i32)], u8, KernelReset, bool);

    /// The decision table: only a successful non-probe pci_dev_specific_reset is a reset.
    #[test]
    fn only_device_specific_counts_as_a_reset() {
        use Func::*;
        use KernelReset as K;
        let cases: &[Case] = &[
            // <=7.1 behind a root port: bus SBR returns 0, needs_reset false; still unreset.
            (
                &[(PciResetBusFunction, 0), (PciResetFunctionLockedInner, 0)],
                0,
                K::Bus,
                true,
            ),
            (
                &[(PciResetFunctionLockedInner, -25), (PciResetBus, 0)],
                0,
                K::Bus,
                true,
            ),
            // A reset call returned 0 but no method probe fired (e.g. inlined).
            (
                &[(PciResetFunctionLockedInner, 0)],
                0,
                K::Unidentified,
                true,
            ),
            // 7.2/7.3: no methods at all.
            (
                &[(PciResetFunctionLockedInner, -25), (PciResetBus, -25)],
                1,
                K::None,
                true,
            ),
            (&[], 1, K::None, true),
            (&[], NEEDS_RESET_UNKNOWN, K::None, true),
            // The quirk failed (link did not come back): bus fallback does not count.
            (
                &[(PciDevSpecificReset, -110), (PciResetBusFunction, 0)],
                0,
                K::Bus,
                true,
            ),
            // 7.4+: the quirk ran.
            (
                &[(PciDevSpecificReset, 0), (PciResetFunctionLockedInner, 0)],
                0,
                K::DeviceSpecific,
                false,
            ),
        ];
        for (attempts, nr, kernel, unreset) in cases {
            let e = release(*nr, attempts);
            assert_eq!(
                (e.kernel_reset, e.left_unreset),
                (Some(*kernel), Some(*unreset)),
                "{attempts:?} needs_reset={nr}"
            );
            assert_eq!(e.line().contains("LEFT UNRESET"), *unreset, "{}", e.line());
        }
        let bus = release(0, &[(PciResetBusFunction, 0)]);
        assert_eq!(bus.needs_reset, Some(false), "reported, not trusted");
        assert!(bus.line().contains("SBR does not reset"), "{}", bus.line());
        assert!(release(1, &[]).line().contains("no reset attempted"));
        assert_eq!(release(NEEDS_RESET_UNKNOWN, &[]).needs_reset, None);
    }

    #[test]
    fn errno_names_of_the_codes_the_reset_paths_return() {
        for (ret, name) in [
            (-1, Some("EPERM")),
            (-5, Some("EIO")),
            (-11, Some("EAGAIN")),
            (-16, Some("EBUSY")),
            (-19, Some("ENODEV")),
            (-22, Some("EINVAL")),
            (-25, Some("ENOTTY")),
            (-110, Some("ETIMEDOUT")),
            (-7, Some("E?")),
            (0, None),
            (3, None),
        ] {
            assert_eq!(errno_name(ret), name, "{ret}");
        }
    }

    /// An open's line names it and what its reset did; the VFIO functions themselves never
    /// count as a reset.
    #[test]
    fn open_lines_and_bracket_functions() {
        let open = decode(&encode(
            EventKind::Open,
            Func::VfioPciCoreEnable,
            0,
            NEEDS_RESET_UNKNOWN,
            &[
                (Func::PciTryResetFunction, 0),
                (Func::PciResetBusFunction, 0),
            ],
        ))
        .unwrap();
        let line = open.line();
        assert!(line.starts_with("open "), "{line}");
        assert!(
            line.contains("pci_try_reset_function=0")
                && line.contains("pci_reset_bus_function=0")
                && line.contains("LEFT UNRESET (kernel: bus reset"),
            "{line}"
        );
        assert!(!resets_device(Func::VfioPciCoreEnable));
        assert!(!resets_device(Func::VfioPciCoreDisable));
        assert!(resets_device(Func::PciResetFunction));
        let ok = release(0, &[(Func::PciDevSpecificReset, 0)]);
        assert!(
            ok.line().starts_with("release ")
                && ok.line().contains("reset by the kernel's device_specific"),
            "{}",
            ok.line()
        );
        assert_eq!(
            release(0, &[(Func::VfioPciCoreEnable, 0)]).kernel_reset,
            Some(KernelReset::None),
            "a nested VFIO call is no reset"
        );
        assert!(
            release(1, &[(Func::PciResetFunctionLockedInner, 0)])
                .line()
                .contains("unidentified")
        );
    }

    /// A kind's name (the metrics' `kind` label) is the schema's, for every kind.
    #[test]
    fn kind_names_are_the_schemas() {
        for k in [Kind::Attempt, Kind::Release, Kind::Open] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        assert_eq!(Kind::Release.name(), "release");
    }

    /// The header bytes: kind and flavour are decoded exactly, unknown values refused.
    #[test]
    fn kinds_and_flavours_decode_exactly() {
        let mut b = encode(EventKind::Open, Func::VfioPciCoreEnable, 0, 0, &[]);
        assert_eq!(decode(&b).unwrap().kind, Kind::Open);
        b[2] = Flavour::Fentry as u8;
        assert_eq!(decode(&b).unwrap().flavour, Flavour::Fentry);
        b[2] = Flavour::Kprobe as u8;
        assert_eq!(decode(&b).unwrap().flavour, Flavour::Kprobe);
        b[2] = 7;
        assert_eq!(decode(&b), Err(DecodeError::Unknown("flavour", 7)));
        b[2] = Flavour::Kprobe as u8;
        b[1] = 9;
        assert_eq!(decode(&b), Err(DecodeError::Unknown("kind", 9)));
        b[1] = EventKind::Release as u8;
        assert_eq!(decode(&b).unwrap().kind, Kind::Release);
    }

    #[test]
    fn rejects_foreign_records() {
        let mut b = encode(EventKind::Attempt, Func::PciResetBus, 0, 0, &[]);
        assert!(matches!(decode(&b[1..]), Err(DecodeError::Size(..))));
        b[0] = 99;
        assert_eq!(decode(&b), Err(DecodeError::Abi(99)));
        b[0] = EVENT_ABI_VERSION;
        b[3] = 200;
        assert_eq!(decode(&b), Err(DecodeError::Unknown("function", 200)));
        // The address is parsed once, here: a garbled one is a bad record, not a string the
        // agent would fail to parse later.
        let mut b = encode(EventKind::Attempt, Func::PciResetBus, 0, 0, &[]);
        let at = b.windows(12).position(|w| w == b"0000:03:00.0").unwrap();
        b[at + 7] = b'x';
        assert!(matches!(decode(&b), Err(DecodeError::Bdf(_))));
    }

    #[test]
    fn json_schema_fields() {
        let e = decode(&encode(
            EventKind::Open,
            Func::VfioPciCoreEnable,
            0,
            NEEDS_RESET_UNKNOWN,
            &[(Func::PciTryResetFunction, -25)],
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        for k in [
            "schema",
            "kind",
            "flavour",
            "function",
            "bdf",
            "vendor",
            "device",
            "ret",
            "errno",
            "duration_ns",
            "ktime_ns",
            "pid",
            "tgid",
            "comm",
            "attempts",
            "attempts_seen",
            "left_unreset",
            "kernel_reset",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["kind"], "open");
        // Typed inside, the schema's text outside.
        assert_eq!(
            (&v["bdf"], &v["vendor"], &v["device"]),
            (&"0000:03:00.0".into(), &"17cb".into(), &"1103".into())
        );
        assert_eq!(
            (&v["flavour"], &v["function"], &v["attempts"][0]["function"]),
            (
                &"kprobe".into(),
                &"vfio_pci_core_enable".into(),
                &"pci_try_reset_function".into()
            )
        );
        assert_eq!(v["left_unreset"], true);
        assert_eq!(v["kernel_reset"], "none");
        assert!(v.get("needs_reset").is_none(), "open has no needs_reset");
    }
}
