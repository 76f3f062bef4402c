//! The collector's per-event validation, "prove valid, or hand back": for each raw JSON event of a request,
//! either the canonical line `schema.EventValidator(event_time="server").validate` would write (and the event's
//! log partition), or None — "not sure: let Python decide". None is always safe; a line is returned only when
//! the event lies inside a strict subset of JSON that this module reads exactly as msgspec and the validator do.
//!
//! What the schema is comes from Python (`gamestream.ingest.native_validate` builds it from
//! `schema.input_event`, the very msgspec types the validator decodes with): every field's name, kind,
//! whether it is required or nullable, its limits (string lengths in code points, integer bounds) and its role
//! in the time rules, in the order msgspec writes them. Only the kinds and the time rules are written here.
//!
//! Handed back (None), among others: an unknown key (the validator keeps it in an extra column, with its value
//! exactly as sent), an extra column given by the sender, a duplicate key (msgspec keeps the last one), a
//! timestamp other than `YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)` or epoch seconds, a double that is not finite
//! or is written `-0.0` (serde_json reads it as it reads the integer literal -0, which msgspec takes as 0.0),
//! an integer literal beyond ±2^53 for a double, anything over `max_event_bytes`, and every event the validator
//! would reject (Python gives the reason).
//!
//! Two readers: `Scanner` for the usual event (fast), serde_json for every other one; both check each value
//! with `ValueSeed`.

use std::borrow::Cow;
use std::fmt;

/// Requests smaller than this are checked without releasing the GIL (see `validate`).
const DETACH_BYTES: usize = 64 * 1024;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

// ------------------------------------------------------------------------------------------- the description

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Str,
    Int,
    Double,
    Bool,
    Time,
    Struct,
}

/// What a field is to the time rules and the output, beyond its kind.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Role {
    /// Kept as given.
    Value,
    /// Kept as given; a new UUIDv7 (at the receive time's millisecond) when absent or null.
    EventId,
    /// The client's own time: falls back on it when `ClientTime` is absent; replaced by the corrected time.
    EventTime,
    /// The device's send time: the event's own, else the request's.
    SentAt,
    /// Checked as a time when given, then replaced by the receive time.
    ReceivedAt,
    /// Checked as a string when given, then replaced by the request's country (absent when it has none): the
    /// server's lookup of the client's address, never the client's word.
    Country,
    /// The device's event time (inside the struct): the event's own, else its `EventTime`.
    ClientTime,
    /// A "rescued data" column: given (not null), the event is handed back (Python joins it).
    Extra,
    /// The string (inside the struct) that picks the log partition.
    PartitionKey,
}

struct FieldSpec {
    name: String,
    /// `"name":` as JSON, written before the value.
    key: Vec<u8>,
    /// `key_prefix(name)`
    prefix: u64,
    kind: Kind,
    required: bool,
    nullable: bool,
    /// Strings: length bounds in code points; integers: value bounds.
    min: Option<i64>,
    max: Option<i64>,
    role: Role,
    children: Vec<FieldSpec>,
}

/// The limits of the time rules that come from the schema.
struct Rules {
    epoch_max: i64,
    max_future_us: i64,
}

/// The UTC range of a timestamp (Python's datetime: years 1 to 9999), in µs since 1970.
const MIN_US: i64 = -62_135_596_800_000_000;
const MAX_US: i64 = 253_402_300_799_999_999;
const US_PER_DAY: i64 = 86_400_000_000;
/// Integers a double holds exactly: msgspec reads a longer integer literal for a double its own way.
const EXACT_IN_DOUBLE: u64 = 1 << 53;

fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "string" => Kind::Str,
        "int" => Kind::Int,
        "double" => Kind::Double,
        "boolean" => Kind::Bool,
        "timestamp" => Kind::Time,
        "struct" => Kind::Struct,
        _ => return None,
    })
}

fn role_of(name: &str) -> Option<Role> {
    Some(match name {
        "value" => Role::Value,
        "event_id" => Role::EventId,
        "event_time" => Role::EventTime,
        "sent_at" => Role::SentAt,
        "received_at" => Role::ReceivedAt,
        "country" => Role::Country,
        "client_time" => Role::ClientTime,
        "extra" => Role::Extra,
        "partition_key" => Role::PartitionKey,
        _ => return None,
    })
}

/// One row of the description: (path, kind, required, nullable, min, max, role); a child's path is
/// `<struct>.<name>`.
type FieldRow = (String, String, bool, bool, Option<i64>, Option<i64>, String);

/// Where the time rules find their fields (indices into the top level, and into the struct's children).
struct Places {
    event_time: usize,
    sent_at: usize,
    params: usize,
    client_time: usize,
    partition_key: usize,
}

fn json_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 3);
    write_str(&mut key, name);
    key.push(b':');
    key
}

fn build(rows: Vec<FieldRow>) -> Result<(Vec<FieldSpec>, Places), String> {
    let mut top: Vec<FieldSpec> = Vec::new();
    for (path, kind_name, required, nullable, min, max, role_name) in rows {
        let kind = kind_of(&kind_name).ok_or_else(|| format!("{path}: unknown kind {kind_name:?}"))?;
        let role = role_of(&role_name).ok_or_else(|| format!("{path}: unknown role {role_name:?}"))?;
        let (parent, name) = match path.split_once('.') {
            Some((parent, name)) => (Some(parent.to_string()), name.to_string()),
            None => (None, path.clone()),
        };
        let spec = FieldSpec { key: json_key(&name), prefix: key_prefix(name.as_bytes()), name, kind, required, nullable, min, max, role,
                               children: Vec::new() };
        match parent {
            None => top.push(spec),
            Some(parent) => {
                if kind == Kind::Struct || spec.name.contains('.') {
                    return Err(format!("{path}: only one level of nesting is supported"));
                }
                let owner = top.iter_mut().find(|f| f.name == parent && f.kind == Kind::Struct)
                    .ok_or_else(|| format!("{path}: no struct {parent:?} before it"))?;
                owner.children.push(spec);
            }
        }
    }
    let one = |fields: &[FieldSpec], role: Role, kind: Kind| -> Result<usize, String> {
        let found: Vec<usize> = fields.iter().enumerate().filter(|(_, f)| f.role == role).map(|(i, _)| i).collect();
        match found[..] {
            [i] if fields[i].kind == kind => Ok(i),
            _ => Err(format!("exactly one field of role {role:?} and kind {kind:?} is needed")),
        }
    };
    let structs: Vec<usize> = top.iter().enumerate().filter(|(_, f)| f.kind == Kind::Struct).map(|(i, _)| i).collect();
    let [params] = structs[..] else { return Err("exactly one struct (eventParams) is needed".into()) };
    if !top[params].required || top[params].nullable {
        return Err("the struct must be required and not nullable".into());
    }
    let children = &top[params].children;
    one(&top, Role::EventId, Kind::Str)?;
    one(&top, Role::ReceivedAt, Kind::Time)?;
    let places = Places {
        event_time: one(&top, Role::EventTime, Kind::Time)?,
        sent_at: one(&top, Role::SentAt, Kind::Time)?,
        params,
        client_time: one(children, Role::ClientTime, Kind::Time)?,
        partition_key: one(children, Role::PartitionKey, Kind::Str)?,
    };
    if !children[places.partition_key].required || children[places.partition_key].nullable {
        return Err("the partition key must be required and not nullable".into());
    }
    if children.iter().any(|f| f.role == Role::Country)
        || top.iter().filter(|f| f.role == Role::Country).any(|f| f.kind != Kind::Str || f.required)
        || top.iter().filter(|f| f.role == Role::Country).count() > 1 {
        return Err("at most one country field, an optional string at the top level".into());
    }
    for f in top.iter().chain(children.iter()) {
        if f.role == Role::Extra && (f.kind != Kind::Str || f.required) {
            return Err(format!("{}: an extra column must be an optional string", f.name));
        }
        if f.required && f.nullable {
            return Err(format!("{}: a required field cannot be nullable here", f.name));
        }
    }
    Ok((top, places))
}

// ------------------------------------------------------------------------------------------------- reading

/// A field's value as read (and checked). The tag is a whole word (`repr(u64)`): with a one-byte tag a `bool`
/// sat in the bytes after it, and every move of a value copied those bytes with loads that straddled two
/// stores (a stall of a dozen cycles, several per field).
#[derive(Clone, Debug)]
#[repr(u64)]
enum Slot<'de> {
    Absent,
    Null,
    Str(Cow<'de, str>),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// µs since 1970, UTC
    Time(i64),
    Struct(Vec<Slot<'de>>),
}

impl Slot<'_> {
    fn time(&self) -> Option<i64> {
        match self {
            Slot::Time(t) => Some(*t),
            _ => None,
        }
    }
}

fn refuse<E: de::Error>(why: &'static str) -> E {
    E::custom(why)
}

/// A key: the index of its field; an unknown key stops the read (the event is handed back).
struct KeySeed<'a> {
    fields: &'a [FieldSpec],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a known key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<usize, E> {
        field_index(self.fields, key).ok_or_else(|| refuse("unknown key"))
    }
}

struct ValueSeed<'a> {
    field: &'a FieldSpec,
    rules: &'a Rules,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Slot<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Slot<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

fn read_struct<'de, A: MapAccess<'de>>(fields: &[FieldSpec], rules: &Rules, mut map: A)
                                       -> Result<Vec<Slot<'de>>, A::Error> {
    let mut slots: Vec<Slot<'de>> = vec![Slot::Absent; fields.len()];
    while let Some(i) = map.next_key_seed(KeySeed { fields })? {
        if !matches!(slots[i], Slot::Absent) {
            return Err(refuse("duplicate key"));
        }
        slots[i] = map.next_value_seed(ValueSeed { field: &fields[i], rules })?;
    }
    for (field, slot) in fields.iter().zip(&slots) {
        if field.required && matches!(slot, Slot::Absent) {
            return Err(refuse("required"));
        }
    }
    Ok(slots)
}

impl ValueSeed<'_> {
    fn string<'de, E: de::Error>(&self, text: Cow<'de, str>) -> Result<Slot<'de>, E> {
        match self.field.kind {
            Kind::Str => {
                if self.field.role == Role::Extra {
                    return Err(refuse("an extra column given"));
                }
                if self.field.min.is_some() || self.field.max.is_some() {
                    let length = if text.is_ascii() { text.len() } else { text.chars().count() } as i64;
                    if self.field.min.is_some_and(|min| length < min) || self.field.max.is_some_and(|max| length > max) {
                        return Err(refuse("string length"));
                    }
                }
                Ok(Slot::Str(text))
            }
            Kind::Time => parse_rfc3339(text.as_bytes()).map(Slot::Time).ok_or_else(|| refuse("timestamp")),
            _ => Err(refuse("a string")),
        }
    }

    fn integer<E: de::Error>(&self, value: i128) -> Result<Slot<'static>, E> {
        match self.field.kind {
            Kind::Int => {
                let low = self.field.min.map_or(i64::MIN as i128, |v| v as i128);
                let high = self.field.max.map_or(i64::MAX as i128, |v| v as i128);
                if value < low || value > high {
                    return Err(refuse("integer out of range"));
                }
                Ok(Slot::Int(value as i64))
            }
            Kind::Double if value.unsigned_abs() <= EXACT_IN_DOUBLE as u128 => Ok(Slot::Double(value as f64)),
            Kind::Time if value >= 0 && value <= self.rules.epoch_max as i128 => {
                Ok(Slot::Time(value as i64 * 1_000_000))
            }
            _ => Err(refuse("an integer")),
        }
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Slot<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a value of kind {:?}", self.field.kind)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
        if self.field.nullable { Ok(Slot::Null) } else { Err(refuse("null")) }
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Slot<'de>, E> {
        if self.field.kind == Kind::Bool { Ok(Slot::Bool(value)) } else { Err(refuse("a boolean")) }
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Slot<'de>, E> {
        self.integer(value as i128)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Slot<'de>, E> {
        self.integer(value as i128)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Slot<'de>, E> {
        match self.field.kind {
            // -0.0 is also what serde_json makes of the integer literal -0, which msgspec reads as 0.0
            Kind::Double if value.is_finite() && !(value == 0.0 && value.is_sign_negative()) => Ok(Slot::Double(value)),
            Kind::Time => epoch_float(value, self.rules.epoch_max).map(Slot::Time).ok_or_else(|| refuse("epoch")),
            _ => Err(refuse("a float")),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Slot<'de>, E> {
        self.string(Cow::Borrowed(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Slot<'de>, E> {
        self.string(Cow::Owned(value.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slot<'de>, A::Error> {
        if self.field.kind != Kind::Struct {
            return Err(refuse("an object"));
        }
        read_struct(&self.field.children, self.rules, map).map(Slot::Struct)
    }
}

/// The top level: an object of the event's fields.
struct EventSeed<'a> {
    fields: &'a [FieldSpec],
    rules: &'a Rules,
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = Vec<Slot<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = Vec<Slot<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        read_struct(self.fields, self.rules, map)
    }
}

// --------------------------------------------------------------------------------------- the fast scanner

/// A reader of the usual event only, ~1.5x faster than serde_json's: objects of known keys whose values are
/// strings without escapes, integers of up to 18 digits, true, false, null (and the one struct), no
/// whitespace, no control character anywhere. It gives up (None) on anything else — then serde_json reads
/// the event — and checks every value it reads with the same rules (`ValueSeed`).
struct Scanner<'de> {
    source: &'de str,
    text: &'de [u8],
    at: usize,
}

/// Whether any byte is below 0x20 (eight at a time: a byte b < 0x20 is one where b - 0x20 borrows into bit 7
/// while b itself has bit 7 clear).
fn has_control_byte(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0u64;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap());
        found |= word.wrapping_sub(ONES * 0x20) & !word & (ONES * 0x80);
    }
    found != 0 || chunks.remainder().iter().any(|&b| b < 0x20)
}

/// The first eight bytes of a key (zero-padded), to tell keys apart without comparing them whole.
fn key_prefix(key: &[u8]) -> u64 {
    let mut prefix = [0u8; 8];
    let n = key.len().min(8);
    prefix[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(prefix)
}

fn field_index(fields: &[FieldSpec], key: &str) -> Option<usize> {
    let (length, prefix) = (key.len(), key_prefix(key.as_bytes()));
    fields.iter().position(|f| f.name.len() == length && f.prefix == prefix && f.name == key)
}

/// The scanner's error: which rule refused does not matter (the event goes to serde_json, then to Python), and
/// a zero-sized error keeps a checked value as small to move as the value itself.
#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

impl de::Error for Refused {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Refused
    }
}

impl<'de> Scanner<'de> {
    fn read_event(text: &'de str, fields: &[FieldSpec], rules: &Rules) -> Option<Vec<Slot<'de>>> {
        let bytes = text.as_bytes();
        if has_control_byte(bytes) {
            return None;
        }
        let mut scanner = Scanner { source: text, text: bytes, at: 0 };
        let slots = scanner.object(fields, rules)?;
        (scanner.at == bytes.len()).then_some(slots)
    }

    fn next(&mut self) -> Option<u8> {
        let byte = *self.text.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    /// After the opening quote: the string up to its closing one, if it holds no escape.
    fn string(&mut self) -> Option<&'de str> {
        let rest = &self.text[self.at..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' {
            return None;
        }
        let start = self.at;
        self.at += end + 1;
        // a quote is a character of its own: the part between two is whole characters (`get` checks it)
        self.source.get(start..start + end)
    }

    /// An integer of 1 to 18 digits (no leading zero), not followed by a fraction or an exponent.
    fn integer(&mut self, first: u8) -> Option<i128> {
        let negative = first == b'-';
        let start = if negative { self.at } else { self.at - 1 };
        let mut end = self.at;
        while end < self.text.len() && self.text[end].is_ascii_digit() {
            end += 1;
        }
        let digits = &self.text[start..end];
        if digits.is_empty() || digits.len() > 18 || (digits[0] == b'0' && digits.len() > 1)
            || matches!(self.text.get(end), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at = end;
        let value = digits.iter().fold(0i128, |v, &d| v * 10 + (d - b'0') as i128);
        Some(if negative { -value } else { value })
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.at + rest.len();
        (self.text.get(self.at..end)? == rest).then(|| self.at = end)
    }

    fn object(&mut self, fields: &[FieldSpec], rules: &Rules) -> Option<Vec<Slot<'de>>> {
        if self.next()? != b'{' {
            return None;
        }
        let mut slots: Vec<Slot<'de>> = vec![Slot::Absent; fields.len()];
        if self.text.get(self.at) == Some(&b'}') {
            self.at += 1;
        } else {
            loop {
                if self.next()? != b'"' {
                    return None;
                }
                let key = self.string()?;
                let i = field_index(fields, key)?;
                if self.next()? != b':' || !matches!(slots[i], Slot::Absent) {
                    return None;
                }
                let value = self.value(&fields[i], rules)?;
                // slots[i] is Absent (checked above): nothing to drop, so none of the drop's code runs here
                std::mem::forget(std::mem::replace(&mut slots[i], value));
                match self.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        for (field, slot) in fields.iter().zip(&slots) {
            if field.required && matches!(slot, Slot::Absent) {
                return None;
            }
        }
        Some(slots)
    }

    fn value(&mut self, field: &FieldSpec, rules: &Rules) -> Option<Slot<'de>> {
        let seed = ValueSeed { field, rules };
        let first = self.next()?;
        let slot: Result<Slot<'de>, Refused> = match first {
            b'"' => seed.string(Cow::Borrowed(self.string()?)),
            b'-' | b'0'..=b'9' => seed.integer(self.integer(first)?),
            b't' => self.literal(b"rue").and(Some(Visitor::visit_bool(seed, true)))?,
            b'f' => self.literal(b"alse").and(Some(Visitor::visit_bool(seed, false)))?,
            b'n' => self.literal(b"ull").and(Some(Visitor::visit_unit(seed)))?,
            b'{' if field.kind == Kind::Struct => {
                self.at -= 1;
                return self.object(&field.children, rules).map(Slot::Struct);
            }
            _ => return None,
        };
        slot.ok()
    }
}

// ---------------------------------------------------------------------------------------------------- times

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + (month <= 2) as i64, month, day)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

pub(crate) fn digits(text: &[u8]) -> Option<i64> {
    let mut value = 0i64;
    for &c in text {
        if !c.is_ascii_digit() {
            return None;
        }
        value = value * 10 + (c - b'0') as i64;
    }
    Some(value)
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)` as µs since 1970 in UTC, or None: any other form (msgspec also
/// takes a space or a lower-case `t`, `+HHMM`, more fractional digits, which it rounds — those are handed
/// back), an impossible date or time (months, days of the month, hours to 23, seconds to 59, year 0), and a
/// time outside years 1 to 9999 once in UTC (the validator rejects it).
pub(crate) fn parse_rfc3339(text: &[u8]) -> Option<i64> {
    if text.len() < 20 || text[4] != b'-' || text[7] != b'-' || text[10] != b'T' || text[13] != b':'
        || text[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(&text[0..4])?, digits(&text[5..7])?, digits(&text[8..10])?);
    let (hour, minute, second) = (digits(&text[11..13])?, digits(&text[14..16])?, digits(&text[17..19])?);
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23
        || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if text[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < text.len() && text[i].is_ascii_digit() {
            i += 1;
        }
        let count = i - start;
        if count == 0 || count > 6 {
            return None;
        }
        micros = digits(&text[start..i])? * 10i64.pow((6 - count) as u32);
    }
    let offset_minutes = match &text[i..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (hours, minutes) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    let local = (days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000 + micros;
    let utc = local - offset_minutes * 60_000_000;
    (MIN_US..=MAX_US).contains(&utc).then_some(utc)
}

/// CPython's `round` with `_PyTime_ROUND_HALF_EVEN` (C's round, then halfway cases to even).
fn round_half_even(x: f64) -> f64 {
    let rounded = x.round();
    if (x - rounded).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { rounded }
}

/// Epoch seconds given as a float, as `datetime.fromtimestamp(value, timezone.utc)` makes them (CPython's
/// `_PyTime_DoubleToDenominator`: the fraction in µs rounded half to even), or None out of [0, epoch_max].
fn epoch_float(value: f64, epoch_max: i64) -> Option<i64> {
    if !(value >= 0.0 && value <= epoch_max as f64) {
        return None;
    }
    let mut whole = value.trunc();
    let mut fraction = round_half_even((value - whole) * 1e6);
    if fraction >= 1e6 {
        fraction -= 1e6;
        whole += 1.0;
    } else if fraction < 0.0 {
        fraction += 1e6;
        whole -= 1.0;
    }
    let micros = whole as i64 * 1_000_000 + fraction as i64;
    (MIN_US..=MAX_US).contains(&micros).then_some(micros)
}

// ---------------------------------------------------------------------------------------------------- writing

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A JSON string as msgspec writes it: `"` and `\` escaped, control characters as `\b \t \n \f \r` or
/// `\u00xx`, everything else (non-ASCII, U+2028, DEL) as UTF-8.
fn write_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let short = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\t' => b't',
            b'\r' => b'r',
            0x08 => b'b',
            0x0c => b'f',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short != 0 {
            out.extend_from_slice(&[b'\\', short]);
        } else {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn two(buffer: &mut [u8], at: usize, value: i64) {
    buffer[at] = b'0' + (value / 10) as u8;
    buffer[at + 1] = b'0' + (value % 10) as u8;
}

/// A UTC time as msgspec writes one: `"YYYY-MM-DDTHH:MM:SS[.ffffff]Z"`, six fractional digits when the µs
/// are not zero, none otherwise. Written into a buffer on the stack, then appended at once.
fn write_time(out: &mut Vec<u8>, micros: i64) {
    let (days, rest) = (micros.div_euclid(US_PER_DAY), micros.rem_euclid(US_PER_DAY));
    let (year, month, day) = civil_from_days(days);
    let (seconds, mut fraction) = (rest / 1_000_000, rest % 1_000_000);
    let mut buffer = *b"\"0000-00-00T00:00:00.000000Z\"";
    two(&mut buffer, 1, year / 100);
    two(&mut buffer, 3, year % 100);
    two(&mut buffer, 6, month);
    two(&mut buffer, 9, day);
    two(&mut buffer, 12, seconds / 3600);
    two(&mut buffer, 15, seconds / 60 % 60);
    two(&mut buffer, 18, seconds % 60);
    if fraction == 0 {
        buffer[20] = b'Z';
        buffer[21] = b'"';
        out.extend_from_slice(&buffer[..22]);
        return;
    }
    for at in (21..27).rev() {
        buffer[at] = b'0' + (fraction % 10) as u8;
        fraction /= 10;
    }
    out.extend_from_slice(&buffer);
}

/// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version 7, 12 random bits, variant 10, 62 random bits;
/// lower-case hex, as `uuid_utils.uuid7()` writes it.
fn write_uuid7(out: &mut Vec<u8>, millis: u64, random: &[u8; 10]) {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70 | (random[0] & 0x0f);
    bytes[7] = random[1];
    bytes[8] = 0x80 | (random[2] & 0x3f);
    bytes[9..].copy_from_slice(&random[3..]);
    out.push(b'"');
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.extend_from_slice(&[HEX[(byte >> 4) as usize], HEX[(byte & 15) as usize]]);
    }
    out.push(b'"');
}

fn write_value(out: &mut Vec<u8>, slot: &Slot) {
    match slot {
        // a string borrowed from the input had no escape, and JSON has no raw control character in a string:
        // nothing to escape, as it was
        Slot::Str(Cow::Borrowed(text)) => {
            out.push(b'"');
            out.extend_from_slice(text.as_bytes());
            out.push(b'"');
        }
        Slot::Str(text) => write_str(out, text),
        Slot::Int(value) => out.extend_from_slice(itoa::Buffer::new().format(*value).as_bytes()),
        Slot::Double(value) => out.extend_from_slice(ryu::Buffer::new().format_finite(*value).as_bytes()),
        Slot::Bool(value) => out.extend_from_slice(if *value { b"true" } else { b"false" }),
        Slot::Time(micros) => write_time(out, *micros),
        Slot::Absent | Slot::Null | Slot::Struct(_) => unreachable!("written by the caller"),
    }
}

/// `,"name":` (no comma before the first field of an object).
fn write_key(out: &mut Vec<u8>, field: &FieldSpec, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
    out.extend_from_slice(&field.key);
}

// ---------------------------------------------------------------------------------------------- the kernel

/// Where an accepted event goes: its partition, or (for a log with its own routing) its partition key.
enum Route {
    Partition(u32),
    Key(String),
}

/// What stays the same for all the events of one request.
pub(crate) struct Request {
    received: i64,
    sent_at: Option<i64>,
    partitions: Option<u32>,
    /// Every event's country, looked up once for the request.
    country: Option<String>,
    /// `received` as written (`write_time`), once for the request.
    received_text: Vec<u8>,
}

impl Request {
    /// The request's constants, refused (ValueError) when out of range.
    pub(crate) fn checked(received: i64, sent_at: Option<i64>, partitions: Option<u32>, country: Option<String>)
                          -> PyResult<Self> {
        if partitions == Some(0) {
            return Err(PyValueError::new_err("partitions must be at least 1"));
        }
        if country.as_ref().is_some_and(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(PyValueError::new_err("country must be two capital letters (ISO 3166-1 alpha-2)"));
        }
        if !(0..=MAX_US).contains(&received) || sent_at.is_some_and(|s| !(MIN_US..=MAX_US).contains(&s)) {
            return Err(PyValueError::new_err("received_us or sent_at_us out of range"));
        }
        let mut received_text = Vec::with_capacity(32);
        write_time(&mut received_text, received);
        Ok(Request { received, sent_at, partitions, country, received_text })
    }
}

/// Whitespace as Python's `bytes.strip` takes it: space, \t, \n, \r, \x0b, \x0c.
fn is_py_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn py_strip(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| !is_py_space(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|&b| !is_py_space(b)).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The events of a body as `envelope.split` cuts them (`lines`: NDJSON, one event a non-blank line, each
/// stripped; else the whole stripped body is one event), or None for a body it does not cut here (empty, a
/// JSON array, or more than `max_events` events).
fn body_events(body: &[u8], lines: bool, max_events: usize) -> Option<Vec<&[u8]>> {
    let stripped = py_strip(body);
    if stripped.is_empty() || stripped[0] == b'[' {
        return None;
    }
    if !lines {
        return (max_events >= 1).then(|| vec![stripped]);
    }
    let mut events = Vec::with_capacity(stripped.len() / 256 + 1);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', stripped).chain(std::iter::once(stripped.len())) {
        let line = &stripped[start..end];
        start = end + 1;
        let line = py_strip(line);
        if !line.is_empty() {
            if events.len() == max_events {
                return None;
            }
            events.push(line);
        }
    }
    Some(events)
}

/// The random bits of a new eventId (`write_uuid7`); None when the system has no randomness to give.
fn random_bits() -> Option<[u8; 10]> {
    let mut bits = [0u8; 10];
    getrandom::fill(&mut bits).ok().map(|_| bits)
}

/// A Python bytes object's data, readable without the GIL (the caller holds a reference to the object).
#[derive(Clone, Copy)]
struct Raw {
    ptr: *const u8,
    len: usize,
}

unsafe impl Send for Raw {}

/// `Validator(fields, *, max_event_bytes, epoch_max, max_future_us)`: the compiled schema (see the module's
/// doc; built by `gamestream.ingest.native_validate`). `validate` checks a request's events with it.
#[pyclass(frozen, module = "gamestream_native")]
pub struct Validator {
    fields: Vec<FieldSpec>,
    places: Places,
    rules: Rules,
    max_event_bytes: usize,
}

impl Validator {
    /// A whole body's events (`body_events`) checked and grouped by partition, in the order sent: `(events,
    /// [(partition, record, count)])`, or None when any event is handed back or the body is not cut here (see
    /// `validate_body`). Needs no GIL: the native front (`front.rs`) calls it from its own threads.
    pub(crate) fn plan_body(&self, data: &[u8], lines: bool, request: &Request, max_events: usize)
                            -> Option<(usize, Vec<(u32, Vec<u8>, usize)>)> {
        let events = body_events(data, lines, max_events)?;
        let mut groups: Vec<(u32, Vec<u8>, usize)> = Vec::new();
        for event in &events {
            let (line, route) = self.check(event, request)?;
            let Route::Partition(partition) = route else { return None };
            match groups.iter_mut().find(|(p, _, _)| *p == partition) {
                Some((_, record, count)) => {
                    record.push(b'\n');
                    record.extend_from_slice(&line);
                    *count += 1;
                }
                None => groups.push((partition, line, 1)),
            }
        }
        Some((events.len(), groups))
    }

    /// The canonical line of one event and its route, or None (hand back; also when no random bits can be had
    /// for a new eventId).
    fn check(&self, raw: &[u8], request: &Request)
             -> Option<(Vec<u8>, Route)> {
        if raw.len() > self.max_event_bytes {
            return None;
        }
        // UTF-8 checked once for the whole event (then serde_json's reader of a str checks no string again)
        let text = std::str::from_utf8(raw).ok()?;
        let slots = match Scanner::read_event(text, &self.fields, &self.rules) {
            Some(slots) => slots,
            None => {
                // anything the scanner does not read (an escape, a float, whitespace, an error): serde_json
                let mut deserializer = serde_json::Deserializer::from_str(text);
                let slots = EventSeed { fields: &self.fields, rules: &self.rules }.deserialize(&mut deserializer)
                    .ok()?;
                deserializer.end().ok()?;
                slots
            }
        };
        let places = &self.places;
        let Slot::Struct(params) = &slots[places.params] else { return None };
        // the validator's time rules (`EventValidator._normalise`, server mode; `schema.corrected_time`)
        let client_time = params[places.client_time].time().or_else(|| slots[places.event_time].time());
        let sent_at = slots[places.sent_at].time().or(request.sent_at);
        let received = request.received;
        let event_time = match (client_time, sent_at) {
            (Some(device_time), Some(sent)) => {
                let corrected = device_time + (received - sent);
                if !(MIN_US..=MAX_US).contains(&corrected) || corrected > received + self.rules.max_future_us {
                    return None; // rejected: out of range, or too far ahead
                }
                corrected
            }
            _ => received,
        };
        let Slot::Str(key) = &params[places.partition_key] else { return None };
        let route = match request.partitions {
            Some(partitions) => Route::Partition(crc32fast::hash(key.as_bytes()) % partitions),
            None => Route::Key(key.to_string()),
        };
        let mut out = Vec::with_capacity(raw.len() + 96);
        out.push(b'{');
        let mut first = true;
        for (i, field) in self.fields.iter().enumerate() {
            let slot = &slots[i];
            match field.role {
                Role::EventId => {
                    write_key(&mut out, field, &mut first);
                    match slot {
                        Slot::Str(_) => write_value(&mut out, slot),
                        _ => write_uuid7(&mut out, received.div_euclid(1000) as u64, &random_bits()?),
                    }
                }
                Role::EventTime => {
                    write_key(&mut out, field, &mut first);
                    if event_time == received {
                        out.extend_from_slice(&request.received_text);
                    } else {
                        write_time(&mut out, event_time);
                    }
                }
                Role::SentAt => {
                    if let Some(sent) = sent_at {
                        write_key(&mut out, field, &mut first);
                        write_time(&mut out, sent);
                    }
                }
                Role::ReceivedAt => {
                    write_key(&mut out, field, &mut first);
                    out.extend_from_slice(&request.received_text);
                }
                Role::Country => {
                    if let Some(country) = &request.country {
                        write_key(&mut out, field, &mut first);
                        write_str(&mut out, country);
                    }
                }
                Role::Extra => {} // given ones were handed back
                _ if i == places.params => {
                    write_key(&mut out, field, &mut first);
                    out.push(b'{');
                    let mut first_child = true;
                    for (j, child) in field.children.iter().enumerate() {
                        if j == places.client_time {
                            if let Some(time) = client_time {
                                write_key(&mut out, child, &mut first_child);
                                write_time(&mut out, time);
                            }
                        } else if !matches!(params[j], Slot::Absent | Slot::Null) {
                            write_key(&mut out, child, &mut first_child);
                            write_value(&mut out, &params[j]);
                        }
                    }
                    out.push(b'}');
                }
                _ => {
                    if !matches!(slot, Slot::Absent | Slot::Null) {
                        write_key(&mut out, field, &mut first);
                        write_value(&mut out, slot);
                    }
                }
            }
        }
        out.push(b'}');
        Some((out, route))
    }
}

#[pymethods]
impl Validator {
    #[new]
    #[pyo3(signature = (fields, *, max_event_bytes, epoch_max, max_future_us))]
    fn new(fields: Vec<FieldRow>, max_event_bytes: usize, epoch_max: i64, max_future_us: i64) -> PyResult<Self> {
        let (fields, places) = build(fields).map_err(PyValueError::new_err)?;
        if !(0..=MAX_US / 1_000_000).contains(&epoch_max) || max_future_us < 0 {
            return Err(PyValueError::new_err("epoch_max or max_future_us out of range"));
        }
        Ok(Validator { fields, places, rules: Rules { epoch_max, max_future_us }, max_event_bytes })
    }

    /// `validate(events, received_us, sent_at_us, partitions, country=None)`: for each item of `events` (raw
    /// JSON bytes; a str, an already known rejection, or anything else gets None), either `(canonical line,
    /// partition)` — the partition being CRC-32(partition key) % `partitions`, or the partition key itself when
    /// `partitions` is None — or None: let the Python validator decide. `received_us` is the receive time,
    /// `sent_at_us` the request's Sent-At (µs since 1970, UTC), `country` every event's country (two capital
    /// letters). The events are checked with the GIL released.
    #[pyo3(signature = (events, received_us, sent_at_us, partitions, country=None))]
    fn validate<'py>(&self, py: Python<'py>, events: &Bound<'py, PyList>, received_us: i64,
                     sent_at_us: Option<i64>, partitions: Option<u32>, country: Option<String>)
                     -> PyResult<Bound<'py, PyList>> {
        let request = Request::checked(received_us, sent_at_us, partitions, country)?;
        // hold every item: the list may change while the GIL is released, its items must not go away
        let items: Vec<Bound<'py, PyAny>> = events.iter().collect();
        let raws: Vec<Option<Raw>> = items.iter().map(|item| {
            item.cast::<PyBytes>().ok().map(|bytes| {
                let data = bytes.as_bytes();
                Raw { ptr: data.as_ptr(), len: data.len() }
            })
        }).collect();
        let bytes: usize = raws.iter().map(|raw| raw.map_or(0, |r| r.len)).sum();
        let work = move || -> Vec<Option<(Vec<u8>, Route)>> {
            raws.iter().map(|raw| {
                let raw = (*raw)?;
                // SAFETY: the bytes object is immutable and kept alive by `items` for the whole call
                let data = unsafe { std::slice::from_raw_parts(raw.ptr, raw.len) };
                self.check(data, &request)
            }).collect()
        };
        // The GIL is released only for work that repays it: a small request's events take a few µs, less than
        // handing the GIL to another thread and waiting to get it back.
        let results = if bytes >= DETACH_BYTES { py.detach(work) } else { work() };
        drop(items);
        let out = PyList::empty(py);
        for result in results {
            match result {
                None => out.append(py.None())?,
                Some((line, route)) => {
                    let line = PyBytes::new(py, &line);
                    let tuple = match route {
                        Route::Partition(p) => PyTuple::new(py, [line.into_any(), p.into_pyobject(py)?.into_any()])?,
                        Route::Key(key) => PyTuple::new(py, [line.into_any(), PyString::new(py, &key).into_any()])?,
                    };
                    out.append(tuple)?;
                }
            }
        }
        Ok(out)
    }

    /// `validate_body(body, lines, received_us, sent_at_us, partitions, country=None, *, max_events)`: a
    /// whole request body at once, when every event in it is taken: `(events, [(partition, record, count),
    /// ...])`, the canonical lines of each partition joined by newlines in the order sent, partitions in order of
    /// first appearance — what `validate` and the caller's grouping make of `envelope.split(body)`, without an
    /// object per event. None when any event is handed back, the body is not cut here (empty, a JSON array:
    /// `body_events`), it holds more than `max_events` events, or the log routes by key (`partitions` None):
    /// the caller then takes the per-event path. The body is read with the GIL released when it is large.
    #[pyo3(signature = (body, lines, received_us, sent_at_us, partitions, country=None, *, max_events))]
    #[allow(clippy::too_many_arguments)]
    fn validate_body<'py>(&self, py: Python<'py>, body: &Bound<'py, PyBytes>, lines: bool, received_us: i64,
                          sent_at_us: Option<i64>, partitions: Option<u32>, country: Option<String>,
                          max_events: usize) -> PyResult<Option<(usize, Bound<'py, PyList>)>> {
        if partitions.is_none() {
            return Ok(None);
        }
        let request = Request::checked(received_us, sent_at_us, partitions, country)?;
        let data = body.as_bytes();
        let raw = Raw { ptr: data.as_ptr(), len: data.len() };
        let work = move || -> Option<(usize, Vec<(u32, Vec<u8>, usize)>)> {
            let raw = raw; // the whole of it (a `*const u8` alone is not Send)
            // SAFETY: the bytes object is immutable and kept alive by `body` for the whole call
            let data = unsafe { std::slice::from_raw_parts(raw.ptr, raw.len) };
            self.plan_body(data, lines, &request, max_events)
        };
        let result = if data.len() >= DETACH_BYTES { py.detach(work) } else { work() };
        let Some((events, groups)) = result else { return Ok(None) };
        let out = PyList::empty(py);
        for (partition, record, count) in groups {
            out.append((partition, PyBytes::new(py, &record), count))?;
        }
        Ok(Some((events, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        for days in [-719_162, -1, 0, 1, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1, 1, 1) * US_PER_DAY, MIN_US);
        assert_eq!(days_from_civil(9999, 12, 31) * US_PER_DAY + US_PER_DAY - 1, MAX_US);
    }

    #[test]
    fn times_are_written_as_msgspec_does() {
        let mut out = Vec::new();
        write_time(&mut out, parse_rfc3339(b"2026-12-05T02:02:03.456+01:00").unwrap());
        assert_eq!(out, b"\"2026-12-05T01:02:03.456000Z\"");
        out.clear();
        write_time(&mut out, MIN_US);
        assert_eq!(out, b"\"0001-01-01T00:00:00Z\"");
    }
}

