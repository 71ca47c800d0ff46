//! PCI addresses as the kernel names them in sysfs ("0000:03:00.0").
use std::fmt;
use std::str::FromStr;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
/// A PCI function's address: domain, bus, device, function.
#[serde(into = "String", try_from = "String")]
pub struct Bdf {
    /// Up to 32 bits: Intel VMD puts its devices in domains from 0x10000 (`10000:e1:00.0`).
    pub domain: u32,
    /// The bus.
    pub bus: u8,
    /// The device (slot).
    pub device: u8,
    /// The function.
    pub function: u8,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "malformed PCI address {input:?}: {why}; expected DDDD:BB:DD.F or BB:DD.F as shown by `lspci -D`, e.g. 0000:03:00.0"
)]
/// A PCI address that does not parse.
pub struct BdfError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| BdfError {
            input: s.to_string(),
            why,
        };
        let (head, function) = s
            .rsplit_once('.')
            .ok_or_else(|| err("no '.' before the function"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0000", *b, *dev),
            _ => return Err(err("wrong number of ':' separated fields")),
        };
        let hex = |field: &str, widths: std::ops::RangeInclusive<usize>, what| {
            if !widths.contains(&field.len()) || !field.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err(what));
            }
            Ok(u32::from_str_radix(field, 16).expect("checked hex digits"))
        };
        let domain = hex(domain, 4..=8, "the domain must be 4 to 8 hex digits")?;
        let bus = hex(bus, 2..=2, "the bus must be 2 hex digits")? as u8;
        let device = hex(device, 2..=2, "the device must be 2 hex digits")?;
        if device > 0x1f {
            return Err(err("the device number must be at most 1f"));
        }
        let function = hex(function, 1..=1, "the function must be one digit 0-7")?;
        if function > 7 {
            return Err(err("the function must be one digit 0-7"));
        }
        Ok(Bdf {
            domain,
            bus,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl TryFrom<String> for Bdf {
    type Error = BdfError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Bdf> for String {
    fn from(b: Bdf) -> String {
        b.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let b: Bdf = "0000:03:00.0".parse().unwrap();
        assert_eq!(
            b,
            Bdf {
                domain: 0,
                bus: 3,
                device: 0,
                function: 0
            }
        );
        assert_eq!(
            "3a:1f.7".parse::<Bdf>().unwrap().to_string(),
            "0000:3a:1f.7"
        );
        // Intel VMD domains have more than 4 hex digits.
        let vmd: Bdf = "10000:e1:00.0".parse().unwrap();
        assert_eq!((vmd.domain, vmd.bus), (0x10000, 0xe1));
        assert_eq!(vmd.to_string(), "10000:e1:00.0");
        assert_eq!(
            "000:00:00.0".parse::<Bdf>().unwrap_err().why,
            "the domain must be 4 to 8 hex digits"
        );
        assert_eq!(
            "123456789:00:00.0".parse::<Bdf>().unwrap_err().why,
            "the domain must be 4 to 8 hex digits"
        );
        let json = serde_json::to_string(&vmd).unwrap();
        assert_eq!(serde_json::from_str::<Bdf>(&json).unwrap(), vmd);
    }

    #[test]
    fn rejects_malformed_input_with_a_reason() {
        for (input, why) in [
            ("", "no '.' before the function"),
            ("0000:03:00", "no '.' before the function"),
            ("0000:03:20.0", "the device number must be at most 1f"),
            ("0000:03:00.8", "the function must be one digit 0-7"),
            ("0000:3:00.0", "the bus must be 2 hex digits"),
            ("zz:00.0", "the bus must be 2 hex digits"),
            ("1:2:3:4.0", "wrong number of ':' separated fields"),
        ] {
            let e = input.parse::<Bdf>().unwrap_err();
            assert_eq!(e.why, why, "{input}");
            assert!(e.to_string().contains("lspci -D"));
        }
    }
}
