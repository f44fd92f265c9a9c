//! The TCG event log (PC Client Platform Firmware Profile, crypto-agile format): parsed,
//! replayed into SHA-256 PCR values, and read for the boot facts a policy asks about.
//!
//! The log is untrusted input: only its replay to the quoted PCR digest makes it evidence,
//! and an event whose data is interpreted must also hash to its own digest.
use sha2::{Digest, Sha256};

use crate::error::VerifyError;

/// The largest event log accepted.
pub const MAX_EVENT_LOG_LEN: usize = 2 * 1024 * 1024;
/// The most events a log may hold.
pub const MAX_EVENTS: usize = 20_000;
/// The number of PCRs of a PC Client TPM.
pub const PCR_COUNT: usize = 24;

const EV_NO_ACTION: u32 = 0x0000_0003;
const EV_SEPARATOR: u32 = 0x0000_0004;
const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
const TPM_ALG_SHA1: u16 = 0x0004;
const TPM_ALG_SHA256: u16 = 0x000B;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
/// EFI_GLOBAL_VARIABLE {8BE4DF61-93CA-11D2-AA0D-00E098032B8C}, in its in-memory (mixed
/// endian) byte order.
const EFI_GLOBAL_VARIABLE: [u8; 16] = [
    0x61, 0xdf, 0xe4, 0x8b, 0xca, 0x93, 0xd2, 0x11, 0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c,
];

/// One measured event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    pcr: usize,
    event_type: u32,
    sha256: [u8; 32],
    data: Vec<u8>,
}

/// A parsed event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    events: Vec<Event>,
    startup_locality: u8,
}

/// What the replay of a log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// The SHA-256 PCR values the log replays to.
    pub pcrs: [[u8; 32]; PCR_COUNT],
    /// Whether the `SecureBoot` variable measured into PCR 7 says enabled (`None`: not
    /// measured).
    pub secure_boot: Option<bool>,
}

fn log_err(m: impl Into<String>) -> VerifyError {
    VerifyError::EventLog(m.into())
}

/// A little-endian reader over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VerifyError> {
        if n > self.rest.len() {
            return Err(log_err("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], VerifyError> {
        let b = self.take(N)?;
        b.try_into().map_err(|_| log_err("truncated"))
    }
    fn u8(&mut self) -> Result<u8, VerifyError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, VerifyError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, VerifyError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, VerifyError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn len32(&mut self) -> Result<usize, VerifyError> {
        usize::try_from(self.u32()?).map_err(|_| log_err("length out of range"))
    }
}

/// Parses a crypto-agile event log (first event: the `Spec ID Event03` header).
pub fn parse_event_log(bytes: &[u8]) -> Result<EventLog, VerifyError> {
    if bytes.len() > MAX_EVENT_LOG_LEN {
        return Err(log_err(format!("larger than {MAX_EVENT_LOG_LEN} bytes")));
    }
    let mut r = Reader { rest: bytes };
    // TCG_PCR_EVENT (SHA-1 format) carrying the TCG_EfiSpecIdEvent.
    let _pcr = r.u32()?;
    if r.u32()? != EV_NO_ACTION {
        return Err(log_err("first event is not the Spec ID header"));
    }
    r.take(20)?;
    let header_len = r.len32()?;
    let mut h = Reader {
        rest: r.take(header_len)?,
    };
    if h.take(16)? != SPEC_ID_SIGNATURE {
        return Err(log_err("not a crypto-agile log (no Spec ID Event03)"));
    }
    let _platform_class = h.u32()?;
    let _minor = h.u8()?;
    let _major = h.u8()?;
    let _errata = h.u8()?;
    let _uintn = h.u8()?;
    let algs = h.u32()?;
    if algs == 0 || algs > 16 {
        return Err(log_err("bad number of digest algorithms"));
    }
    let mut sizes: Vec<(u16, usize)> = Vec::new();
    for _ in 0..algs {
        let id = h.u16()?;
        let size = usize::from(h.u16()?);
        sizes.push((id, size));
    }
    if !sizes
        .iter()
        .any(|(id, size)| *id == TPM_ALG_SHA256 && *size == 32)
    {
        return Err(log_err("log has no SHA-256 digests"));
    }

    let mut events = Vec::new();
    let mut startup_locality = 0u8;
    while !r.rest.is_empty() {
        if events.len() >= MAX_EVENTS {
            return Err(log_err(format!("more than {MAX_EVENTS} events")));
        }
        let pcr = usize::try_from(r.u32()?).map_err(|_| log_err("PCR index"))?;
        let event_type = r.u32()?;
        let count = r.u32()?;
        if count == 0 || count > 16 {
            return Err(log_err("bad digest count"));
        }
        let mut sha256 = None;
        for _ in 0..count {
            let id = r.u16()?;
            let size = sizes
                .iter()
                .find(|(a, _)| *a == id)
                .map(|(_, s)| *s)
                .ok_or_else(|| log_err(format!("digest algorithm {id:#06x} not in header")))?;
            let d = r.take(size)?;
            if id == TPM_ALG_SHA256 {
                sha256 = Some(<[u8; 32]>::try_from(d).map_err(|_| log_err("SHA-256 size"))?);
            } else if id == TPM_ALG_SHA1 && size != 20 {
                return Err(log_err("SHA-1 size"));
            }
        }
        let data_len = r.len32()?;
        let data = r.take(data_len)?.to_vec();
        if event_type == EV_NO_ACTION {
            // Not extended. The one that matters: the locality of TPM2_Startup, which is
            // PCR 0's initial value.
            if pcr == 0
                && let Some(sig) = data.get(..16)
                && sig == STARTUP_LOCALITY_SIGNATURE
            {
                startup_locality = *data.get(16).ok_or_else(|| log_err("StartupLocality"))?;
            }
            continue;
        }
        if pcr >= PCR_COUNT {
            return Err(log_err(format!("PCR index {pcr} out of range")));
        }
        let sha256 = sha256.ok_or_else(|| log_err("event without a SHA-256 digest"))?;
        events.push(Event {
            pcr,
            event_type,
            sha256,
            data,
        });
    }
    Ok(EventLog {
        events,
        startup_locality,
    })
}

impl EventLog {
    /// Replays the log into SHA-256 PCR values and reads the Secure Boot state.
    pub fn replay(&self) -> Result<BootState, VerifyError> {
        let mut pcrs = [[0u8; 32]; PCR_COUNT];
        pcrs[0][31] = self.startup_locality;
        let mut secure_boot = None;
        for ev in &self.events {
            let pcr = pcrs
                .get_mut(ev.pcr)
                .ok_or_else(|| log_err("PCR index out of range"))?;
            let mut h = Sha256::new();
            h.update(*pcr);
            h.update(ev.sha256);
            *pcr = h.finalize().into();
            if ev.pcr == 7
                && ev.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG
                && let Some(enabled) = secure_boot_variable(ev)?
            {
                secure_boot = Some(enabled);
            }
        }
        Ok(BootState { pcrs, secure_boot })
    }
}

/// If `ev` measures the `SecureBoot` variable, whether it says enabled. The event's data
/// must hash to its digest: the data is read, so it must be what was extended.
fn secure_boot_variable(ev: &Event) -> Result<Option<bool>, VerifyError> {
    let mut r = Reader { rest: &ev.data };
    let guid = r.array::<16>()?;
    let name_chars = usize::try_from(r.u64()?).map_err(|_| log_err("variable name length"))?;
    let data_len = usize::try_from(r.u64()?).map_err(|_| log_err("variable data length"))?;
    let name_bytes = r.take(name_chars.checked_mul(2).ok_or_else(|| log_err("name"))?)?;
    let value = r.take(data_len)?;
    let name: Vec<u16> = name_bytes
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .collect();
    if guid != EFI_GLOBAL_VARIABLE || String::from_utf16_lossy(&name) != "SecureBoot" {
        return Ok(None);
    }
    if <[u8; 32]>::from(Sha256::digest(&ev.data)) != ev.sha256 {
        return Err(log_err(
            "the SecureBoot variable event does not match its digest",
        ));
    }
    Ok(Some(value == [1]))
}

/// Writes a crypto-agile event log with SHA-256 digests: for devices whose firmware keeps
/// no log, and for tests. Each call returns the digest to extend into the TPM's PCR.
#[derive(Debug, Clone)]
pub struct EventLogBuilder {
    bytes: Vec<u8>,
}

impl Default for EventLogBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLogBuilder {
    /// A log holding only the Spec ID header.
    pub fn new() -> Self {
        let mut spec = SPEC_ID_SIGNATURE.to_vec();
        spec.extend_from_slice(&0u32.to_le_bytes()); // platform class: client
        spec.extend_from_slice(&[0, 2, 0, 2]); // spec 2.0 errata 0, UINTN = 8 bytes
        spec.extend_from_slice(&1u32.to_le_bytes());
        spec.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
        spec.extend_from_slice(&32u16.to_le_bytes());
        spec.push(0); // no vendor info
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 20]);
        bytes.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&spec);
        Self { bytes }
    }

    /// Appends an event whose digest is SHA-256(`data`); returns that digest.
    pub fn event(&mut self, pcr: u32, event_type: u32, data: &[u8]) -> [u8; 32] {
        let digest: [u8; 32] = Sha256::digest(data).into();
        self.bytes.extend_from_slice(&pcr.to_le_bytes());
        self.bytes.extend_from_slice(&event_type.to_le_bytes());
        self.bytes.extend_from_slice(&1u32.to_le_bytes());
        self.bytes.extend_from_slice(&TPM_ALG_SHA256.to_le_bytes());
        self.bytes.extend_from_slice(&digest);
        self.bytes
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(data);
        digest
    }

    /// Appends the measurement of the `SecureBoot` variable into PCR 7.
    pub fn secure_boot(&mut self, enabled: bool) -> [u8; 32] {
        let name: Vec<u8> = "SecureBoot"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let mut data = EFI_GLOBAL_VARIABLE.to_vec();
        data.extend_from_slice(&10u64.to_le_bytes());
        data.extend_from_slice(&1u64.to_le_bytes());
        data.extend_from_slice(&name);
        data.push(u8::from(enabled));
        self.event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, &data)
    }

    /// Appends the separator that ends the pre-OS measurements of `pcr`.
    pub fn separator(&mut self, pcr: u32) -> [u8; 32] {
        self.event(pcr, EV_SEPARATOR, &[0, 0, 0, 0])
    }

    /// The log's bytes.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extend(pcr: [u8; 32], d: [u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(d);
        h.finalize().into()
    }

    #[test]
    fn a_built_log_replays_to_its_extends() {
        let mut b = EventLogBuilder::new();
        let d1 = b.event(0, 0x0000_0008, b"firmware");
        let d2 = b.secure_boot(true);
        let d3 = b.separator(7);
        let log = parse_event_log(&b.finish()).unwrap_or_else(|e| panic!("{e}"));
        let state = log.replay().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state.pcrs[0], extend([0; 32], d1));
        assert_eq!(state.pcrs[7], extend(extend([0; 32], d2), d3));
        assert_eq!(state.secure_boot, Some(true));
    }

    #[test]
    fn secure_boot_disabled_is_read_as_disabled() {
        let mut b = EventLogBuilder::new();
        b.secure_boot(false);
        let state = parse_event_log(&b.finish())
            .and_then(|l| l.replay())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state.secure_boot, Some(false));
    }

    #[test]
    fn a_truncated_log_is_refused() {
        let mut b = EventLogBuilder::new();
        b.event(4, 0x8000_0003, b"bootloader");
        let bytes = b.finish();
        for cut in [1, 10, bytes.len() - 1] {
            let r = parse_event_log(bytes.get(..bytes.len() - cut).unwrap_or_default());
            assert!(matches!(r, Err(VerifyError::EventLog(_))), "cut {cut}");
        }
    }

    #[test]
    fn a_secure_boot_event_whose_data_was_changed_is_refused() {
        let mut b = EventLogBuilder::new();
        b.secure_boot(false);
        let mut bytes = b.finish();
        // The last byte is the variable's value: claim enabled while the digest says not.
        if let Some(last) = bytes.last_mut() {
            *last = 1;
        }
        let r = parse_event_log(&bytes).and_then(|l| l.replay());
        assert!(matches!(r, Err(VerifyError::EventLog(_))));
    }

    #[test]
    fn a_log_without_the_spec_id_header_is_refused() {
        assert!(parse_event_log(&[0u8; 64]).is_err());
        assert!(parse_event_log(&[]).is_err());
    }
}
