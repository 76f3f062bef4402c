//! `decode_lines`: NDJSON lines (the canonical lines gamestream's collectors write to the log) as Arrow
//! columns of the processor's decode schema — "prove, or hand back", as `validate.rs` does for the collector.
//!
//! The processor read these lines with pyarrow's JSON reader (an explicit schema, unexpected fields an error):
//! 30–40 % of its CPU on the HTTP path. This reads the same lines into the same columns, or gives None — then
//! pyarrow reads them as before, and decides what its errors mean. It takes only what it can read exactly as
//! pyarrow does:
//!
//! - one JSON object per line, no whitespace around or inside it (a canonical line); empty lines are skipped;
//! - keys of the schema only, each at most once; the struct column (`eventParams`) as an object or null;
//! - strings as strings (escapes decoded; a lone surrogate escape is handed back);
//! - integers for integer columns (no fraction, no exponent, within the type);
//! - any JSON number for a double, parsed correctly rounded as pyarrow's reader does (an infinite result, an
//!   exponent over 308 or of over 4 digits are handed back);
//! - true/false for a boolean;
//! - timestamps as `YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z` strings (any other form, an impossible date or time, is
//!   handed back);
//! - null anywhere; an absent key is null.
//!
//! Anything else (another value type, whitespace or a control character, invalid UTF-8, a string column past
//! 2 GiB, no line at all) gives None for the whole buffer. tests/test_native_decode.py holds the result equal to
//! pyarrow's (hypothesis).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::validate::{digits, parse_rfc3339};
use crate::Bytes;

const STRING: u8 = 0;
const INT32: u8 = 1;
const INT64: u8 = 2;
const DOUBLE: u8 = 3;
const BOOL: u8 = 4;
const TIMESTAMP: u8 = 5;
const STRUCT: u8 = 6;

/// A column of the schema: its JSON key, its kind, and (a struct) its children.
pub(crate) struct Spec {
    name: String,
    kind: u8,
    children: Vec<Spec>,
}

enum Values {
    Str { offsets: Vec<i32>, data: Vec<u8> },
    I32(Vec<i32>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Struct(Vec<Column>),
}

struct Column {
    valid: Vec<bool>,
    values: Values,
}

impl Column {
    /// An empty column with room for `rows` values.
    fn new(spec: &Spec, rows: usize) -> Column {
        let values = match spec.kind {
            STRING => {
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0);
                Values::Str { offsets, data: Vec::new() }
            }
            INT32 => Values::I32(Vec::with_capacity(rows)),
            INT64 | TIMESTAMP => Values::I64(Vec::with_capacity(rows)),
            DOUBLE => Values::F64(Vec::with_capacity(rows)),
            BOOL => Values::Bool(Vec::with_capacity(rows)),
            _ => Values::Struct(spec.children.iter().map(|child| Column::new(child, rows)).collect()),
        };
        Column { valid: Vec::with_capacity(rows), values }
    }

    /// A null in this row (a struct's children get one too).
    fn null(&mut self) {
        self.valid.push(false);
        match &mut self.values {
            Values::Str { offsets, .. } => offsets.push(*offsets.last().unwrap()),
            Values::I32(v) => v.push(0),
            Values::I64(v) => v.push(0),
            Values::F64(v) => v.push(0.0),
            Values::Bool(v) => v.push(false),
            Values::Struct(children) => children.iter_mut().for_each(Column::null),
        }
    }
}

struct Reader<'a> {
    text: &'a [u8],
    at: usize,
    scratch: Vec<u8>,
    nested: Vec<bool>, // which keys a struct value had (one level: the schema nests no deeper)
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.text.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.at + rest.len();
        (self.text.get(self.at..end)? == rest).then(|| self.at = end)
    }

    /// After the opening quote: the string's bytes up to the closing quote, escapes decoded into `scratch` when
    /// there are any (then the result is `scratch`'s).
    fn string(&mut self) -> Option<Text<'a>> {
        let rest = &self.text[self.at..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] == b'"' {
            self.at += end + 1;
            return Some(Text::Borrowed(&rest[..end]));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&rest[..end]);
        self.at += end;
        loop {
            let rest = &self.text[self.at..];
            let end = memchr::memchr2(b'"', b'\\', rest)?;
            self.scratch.extend_from_slice(&rest[..end]);
            self.at += end + 1;
            if rest[end] == b'"' {
                return Some(Text::Scratch);
            }
            let escape = self.next()?;
            let byte = match escape {
                b'"' => b'"',
                b'\\' => b'\\',
                b'/' => b'/',
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'u' => {
                    let first = self.hex4()?;
                    let code = match first {
                        0xD800..=0xDBFF => {
                            self.literal(b"\\u")?;
                            let second = self.hex4()?;
                            if !(0xDC00..=0xDFFF).contains(&second) {
                                return None;
                            }
                            0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                        }
                        0xDC00..=0xDFFF => return None,
                        _ => first,
                    };
                    let mut utf8 = [0u8; 4];
                    self.scratch.extend_from_slice(char::from_u32(code)?.encode_utf8(&mut utf8).as_bytes());
                    continue;
                }
                _ => return None,
            };
            self.scratch.push(byte);
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.get(self.at..self.at + 4)?;
        self.at += 4;
        digits.iter().try_fold(0u32, |v, &d| Some(v * 16 + (d as char).to_digit(16)?))
    }

    /// A JSON number's text, starting at `first` (already read).
    fn number(&mut self) -> Option<&'a [u8]> {
        let start = self.at - 1;
        let text = self.text;
        let mut i = self.at;
        let digit = |i: usize| text.get(i).is_some_and(u8::is_ascii_digit);
        if text[start] == b'-' {
            if !digit(i) {
                return None;
            }
            i += 1;
        }
        let first_digit = text[i - 1];
        if first_digit == b'0' {
            if digit(i) {
                return None; // a leading zero
            }
        } else {
            while digit(i) {
                i += 1;
            }
        }
        if text.get(i) == Some(&b'.') {
            i += 1;
            if !digit(i) {
                return None;
            }
            while digit(i) {
                i += 1;
            }
        }
        if matches!(text.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(text.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digit(i) {
                return None;
            }
            while digit(i) {
                i += 1;
            }
        }
        self.at = i;
        Some(&text[start..i])
    }

    /// An object's members into `columns` (one row each), keys from `specs`.
    fn object(&mut self, specs: &[Spec], columns: &mut [Column], seen: &mut Vec<bool>) -> Option<()> {
        if self.next()? != b'{' {
            return None;
        }
        seen.clear();
        seen.resize(specs.len(), false);
        if self.text.get(self.at) == Some(&b'}') {
            self.at += 1;
        } else {
            loop {
                if self.next()? != b'"' {
                    return None;
                }
                let key = match self.string()? {
                    Text::Borrowed(key) => key,
                    Text::Scratch => return None, // an escaped key: no key of the schema needs one
                };
                let i = specs.iter().position(|s| s.name.as_bytes() == key)?;
                if seen[i] || self.next()? != b':' {
                    return None;
                }
                seen[i] = true;
                self.value(&specs[i], &mut columns[i])?;
                match self.next()? {
                    b',' => continue,
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        for (column, _) in columns.iter_mut().zip(seen.iter()).filter(|(_, seen)| !**seen) {
            column.null();
        }
        Some(())
    }

    fn value(&mut self, spec: &Spec, column: &mut Column) -> Option<()> {
        let first = self.next()?;
        if first == b'n' {
            self.literal(b"ull")?;
            column.null();
            return Some(());
        }
        match (&mut column.values, first) {
            (Values::Str { offsets, data }, b'"') => {
                match self.string()? {
                    Text::Borrowed(text) => data.extend_from_slice(text),
                    Text::Scratch => data.extend_from_slice(&self.scratch),
                }
                offsets.push(i32::try_from(data.len()).ok()?);
            }
            (Values::I64(values), b'"') if spec.kind == TIMESTAMP => {
                let text = match self.string()? {
                    Text::Borrowed(text) => text,
                    Text::Scratch => return None,
                };
                values.push(utc_micros(text)?);
            }
            (Values::I32(values), b'-' | b'0'..=b'9') => values.push(i32::try_from(integer(self.number()?)?).ok()?),
            (Values::I64(values), b'-' | b'0'..=b'9') if spec.kind == INT64 => values.push(integer(self.number()?)?),
            (Values::F64(values), b'-' | b'0'..=b'9') => {
                // both round correctly (pyarrow converts the number's text itself, to 0 or a subnormal too);
                // handed back: an infinite result, and an exponent above 308 or of over 4 digits, which
                // pyarrow's tokenizer refuses as "too big" whatever the digits before it
                let text = self.number()?;
                let value: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
                if let Some(at) = text.iter().position(|b| matches!(b, b'e' | b'E')) {
                    let exponent = &text[at + 1..];
                    let (negative, figures) = match exponent {
                        [b'-', rest @ ..] => (true, rest),
                        [b'+', rest @ ..] => (false, rest),
                        rest => (false, rest),
                    };
                    if figures.len() > 4 || (!negative && digits(figures)? > 308) {
                        return None;
                    }
                }
                if !value.is_finite() {
                    return None;
                }
                values.push(value);
            }
            (Values::Bool(values), b't') => {
                self.literal(b"rue")?;
                values.push(true);
            }
            (Values::Bool(values), b'f') => {
                self.literal(b"alse")?;
                values.push(false);
            }
            (Values::Struct(children), b'{') => {
                self.at -= 1;
                let mut seen = std::mem::take(&mut self.nested);
                let read = self.object(&spec.children, children, &mut seen);
                self.nested = seen;
                read?;
            }
            _ => return None,
        }
        column.valid.push(true);
        Some(())
    }
}

enum Text<'a> {
    Borrowed(&'a [u8]),
    Scratch,
}

/// An integer's text (no fraction, no exponent) as an i64.
fn integer(text: &[u8]) -> Option<i64> {
    if text.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z` (years 1 to 9999) as µs since 1970, or None: the validator's parser, with
/// `Z` only (an offset is pyarrow's to judge).
fn utc_micros(text: &[u8]) -> Option<i64> {
    if text.last() != Some(&b'Z') {
        return None;
    }
    parse_rfc3339(text)
}

/// How many bytes of `text` are below 0x20 (counted in byte lanes, 255 bytes at a time: vectorised).
fn control_bytes(text: &[u8]) -> usize {
    text.chunks(255).map(|chunk| chunk.iter().fold(0u8, |n, &b| n.wrapping_add((b < 0x20) as u8)) as usize).sum()
}

fn specs_of(fields: &Bound<'_, PyList>) -> PyResult<Vec<Spec>> {
    let mut specs = Vec::with_capacity(fields.len());
    for item in fields.iter() {
        let (name, kind, children): (String, u8, Bound<'_, PyList>) = item.extract()?;
        if kind > STRUCT || (kind == STRUCT) == children.is_empty() {
            return Err(PyValueError::new_err(format!("decode_lines: field {name} has an unknown layout")));
        }
        specs.push(Spec { name, kind, children: specs_of(&children)? });
    }
    Ok(specs)
}

fn bitmap(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// The values' little-endian bytes, written straight into a new Python bytes object.
fn little_endian<'py, T: Copy, const N: usize>(py: Python<'py>, values: &[T], bytes: fn(T) -> [u8; N])
                                               -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, values.len() * N, |out| {
        for (chunk, &value) in out.chunks_exact_mut(N).zip(values) {
            chunk.copy_from_slice(&bytes(value));
        }
        Ok(())
    })
}

/// A column for Python: (validity bitmap or None, then its buffers: offsets and data, or values; a struct's
/// children as a list).
fn to_python<'py>(py: Python<'py>, column: &Column) -> PyResult<Bound<'py, PyTuple>> {
    let validity = if column.valid.iter().all(|v| *v) {
        py.None().into_bound(py)
    } else {
        PyBytes::new(py, &bitmap(&column.valid)).into_any()
    };
    let buffers: Vec<Bound<'py, PyAny>> = match &column.values {
        Values::Str { offsets, data } => vec![little_endian(py, offsets, i32::to_le_bytes)?.into_any(),
                                              PyBytes::new(py, data).into_any()],
        Values::I32(v) => vec![little_endian(py, v, i32::to_le_bytes)?.into_any()],
        Values::I64(v) => vec![little_endian(py, v, i64::to_le_bytes)?.into_any()],
        Values::F64(v) => vec![little_endian(py, v, f64::to_le_bytes)?.into_any()],
        Values::Bool(v) => vec![PyBytes::new(py, &bitmap(v)).into_any()],
        Values::Struct(children) => {
            let list = PyList::empty(py);
            for child in children {
                list.append(to_python(py, child)?)?;
            }
            vec![list.into_any()]
        }
    };
    let mut items = Vec::with_capacity(1 + buffers.len());
    items.push(validity);
    items.extend(buffers);
    PyTuple::new(py, items)
}

/// `decode_lines(data, fields)`: the NDJSON lines of the buffers `data` (as if joined by newlines: each holds
/// whole lines, a record's payload) as columns, one per field of `fields` — a list of
/// (JSON key, kind, children) with kinds 0 string, 1 int32, 2 int64, 3 double, 4 boolean, 5 timestamp (µs, UTC),
/// 6 struct (children: the same list) — as (row count, [column, ...]) where a column is (validity bitmap or
/// None, buffers...) in Arrow's layout; or None when a line is not one this reads exactly as pyarrow's JSON
/// reader would (see the module's documentation).
#[pyfunction]
pub(crate) fn decode_lines<'py>(py: Python<'py>, data: Vec<PyBuffer<u8>>, fields: Bound<'py, PyList>)
                                -> PyResult<Option<(usize, Bound<'py, PyList>)>> {
    let specs = specs_of(&fields)?;
    let views = data.iter().map(Bytes::of).collect::<PyResult<Vec<Bytes>>>()?;
    let decoded = py.detach(move || -> Option<(usize, Vec<Column>)> {
        let texts: Vec<&[u8]> = views.iter().map(Bytes::slice).collect();
        let mut newlines = 0;
        for text in &texts {
            std::str::from_utf8(text).ok()?;
            let here = memchr::memchr_iter(b'\n', text).count();
            if control_bytes(text) != here {
                return None; // whitespace, or a raw control character in a string: pyarrow's to judge
            }
            newlines += here + 1;
        }
        let mut columns: Vec<Column> = specs.iter().map(|spec| Column::new(spec, newlines)).collect();
        let mut seen = Vec::with_capacity(specs.len());
        let mut reader = Reader { text: &[], at: 0, scratch: Vec::new(), nested: Vec::new() };
        let mut rows = 0;
        for text in texts {
            let mut start = 0;
            for end in memchr::memchr_iter(b'\n', text).chain(std::iter::once(text.len())) {
                let line = &text[start..end];
                start = end + 1;
                if line.is_empty() {
                    continue;
                }
                reader.text = line;
                reader.at = 0;
                reader.object(&specs, &mut columns, &mut seen)?;
                if reader.at != line.len() {
                    return None;
                }
                rows += 1;
            }
        }
        (rows > 0).then_some((rows, columns))
    });
    let Some((rows, columns)) = decoded else { return Ok(None) };
    let list = PyList::empty(py);
    for column in &columns {
        list.append(to_python(py, column)?)?;
    }
    Ok(Some((rows, list)))
}
