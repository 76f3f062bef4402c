//! gamestream's native kernels: what deduplication by eventId computes for every event, over Arrow buffers
//! handed in by `gamestream.process.identity` (as numpy byte views), with the GIL released.
//!
//! - `uuid_keys`: an eventId written as a UUID (8-4-4-4-12 hex digits, either case) keyed by its own lower 64
//!   bits (the variant and the random bits of v4 and v7).
//! - `fingerprints`: a 64-bit fingerprint of each row's payload columns, XXH3 chained column by column (each
//!   value hashed with a seed made of the hash so far and the column's name); a null adds nothing, so a column
//!   added to the schema later (null in older events) leaves fingerprints as they were. XXH3 is specified and
//!   stable: fingerprints stored in `event_ids` stay comparable across versions.
//! - `newline_cuts`: where chunks of a given number of lines end in a file, for `gamestream load`.
//! - `crc32_partitions`: the log partition of each device id of an Arrow string array (zlib's CRC-32).
//! - `merge_runs`, `bucket_starts`, `find_in_run` (runs.rs): the deduplication state's sorted runs of keys.
//! - `decode_lines` (decode.rs): the processor's NDJSON records as Arrow columns, or None (pyarrow reads them).
//! - `Validator` (validate.rs): the collector's per-event validation, "prove valid, or hand back" — for each
//!   raw JSON event, the canonical line `schema.EventValidator` would write and its partition, or None.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

mod decode;
mod front;
mod runs;
mod validate;

/// A read-only view of a Python buffer's bytes that may cross into a thread without the GIL (the caller keeps
/// the objects alive for the whole call).
#[derive(Clone, Copy)]
pub(crate) struct Bytes {
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
}

unsafe impl Send for Bytes {}

impl Bytes {
    pub(crate) fn of(buffer: &PyBuffer<u8>) -> PyResult<Bytes> {
        if !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("a buffer handed to gamestream_native must be contiguous"));
        }
        Ok(Bytes { ptr: buffer.buf_ptr() as *const u8, len: buffer.len_bytes() })
    }

    pub(crate) fn slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A writable view (numpy arrays the caller allocated for the results).
pub(crate) struct Out {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
}

unsafe impl Send for Out {}

impl Out {
    pub(crate) fn of(buffer: &PyBuffer<u8>) -> PyResult<Out> {
        if buffer.readonly() || !buffer.is_c_contiguous() {
            return Err(PyValueError::new_err("an output buffer must be writable and contiguous"));
        }
        Ok(Out { ptr: buffer.buf_ptr() as *mut u8, len: buffer.len_bytes() })
    }

    fn slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

fn offset_at(offsets: &[u8], i: usize) -> usize {
    i32::from_le_bytes(offsets[4 * i..4 * i + 4].try_into().unwrap()) as usize
}

const NOT_HEX: u8 = 0xFF;

const fn hex_table() -> [u8; 256] {
    let mut table = [NOT_HEX; 256];
    let mut c = 0;
    while c < 10 {
        table[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        table[b'a' as usize + c] = 10 + c as u8;
        table[b'A' as usize + c] = 10 + c as u8;
        c += 1;
    }
    table
}

static HEX: [u8; 256] = hex_table();
/// The hex digits of `8-4-4-4-12` before the key, and the 16 of the key (digits 19–22 and 24–35).
const HEAD: [usize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17];
const KEY: [usize; 16] = [19, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35];

/// The key of one UUID's text, or None when it is not one.
fn uuid_key(text: &[u8]) -> Option<u64> {
    if text.len() != 36 || text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    let mut bad = 0u8; // NOT_HEX has the high bits a nibble never has
    for i in HEAD {
        bad |= HEX[text[i] as usize];
    }
    let mut key: u64 = 0;
    for i in KEY {
        let nibble = HEX[text[i] as usize];
        bad |= nibble;
        key = (key << 4) | (nibble & 0x0F) as u64;
    }
    if bad & 0xF0 != 0 { None } else { Some(key) }
}

/// `uuid_keys(offsets, data, keys, is_uuid)`: for the n strings of an Arrow string array (`offsets`: its n + 1
/// int32 offsets, from the array's own offset on; `data`: its value buffer), writes each key as a
/// little-endian uint64 into `keys` (n × 8 bytes; 0 where not a UUID) and 1 or 0 into `is_uuid` (n bytes).
#[pyfunction]
fn uuid_keys(
    py: Python<'_>,
    offsets: PyBuffer<u8>,
    data: PyBuffer<u8>,
    keys: PyBuffer<u8>,
    is_uuid: PyBuffer<u8>,
) -> PyResult<()> {
    let (offsets_view, data_view) = (Bytes::of(&offsets)?, Bytes::of(&data)?);
    let (mut keys_out, mut flags_out) = (Out::of(&keys)?, Out::of(&is_uuid)?);
    let n = (offsets_view.len / 4).saturating_sub(1);
    if keys_out.len != 8 * n || flags_out.len != n {
        return Err(PyValueError::new_err("uuid_keys: the outputs must hold n keys and n flags"));
    }
    py.detach(move || {
        let (offsets, data) = (offsets_view.slice(), data_view.slice());
        let (keys, flags) = (keys_out.slice(), flags_out.slice());
        for i in 0..n {
            let (start, end) = (offset_at(offsets, i), offset_at(offsets, i + 1));
            let key = if end <= data.len() && start <= end { uuid_key(&data[start..end]) } else { None };
            keys[8 * i..8 * i + 8].copy_from_slice(&key.unwrap_or(0).to_le_bytes());
            flags[i] = key.is_some() as u8;
        }
    });
    Ok(())
}

/// One column of `fingerprints`: (name, kind, validity bitmap or None, offset of the array's first element,
/// int32 offsets (strings) or None, data) — the Arrow array's own buffers, untouched. Kinds: `STRING` (UTF-8 or
/// binary, int32 offsets), `INT64` (also float64 and timestamps: 8 bytes as stored), `INT32` (also date32:
/// widened to 8 bytes), `FLOAT32` (widened to float64), `BOOL` (bits, as an 8-byte 0 or 1).
type Column = (String, u8, Option<PyBuffer<u8>>, usize, Option<PyBuffer<u8>>, PyBuffer<u8>);

const STRING: u8 = 0;
const INT64: u8 = 1;
const INT32: u8 = 2;
const FLOAT32: u8 = 3;
const BOOL: u8 = 4;

struct ColumnView {
    name: u64,
    kind: u8,
    validity: Option<Bytes>,
    offset: usize,
    offsets: Option<Bytes>,
    data: Bytes,
}

fn bit(bytes: &[u8], index: usize) -> Option<bool> {
    bytes.get(index / 8).map(|byte| byte & (1 << (index % 8)) != 0)
}

impl ColumnView {
    /// Folds this column's value of every row into the row's hash: h = XXH3-64(value, seed = h ^ name); a null
    /// leaves h as it was. None when a buffer is shorter than the rows it should hold.
    fn fold(&self, hashes: &mut [u64]) -> Option<()> {
        let data = self.data.slice();
        let validity = self.validity.map(|v| v.slice());
        let offsets = self.offsets.map(|v| v.slice());
        for (row, h) in hashes.iter_mut().enumerate() {
            let index = self.offset + row;
            if let Some(validity) = validity {
                if !bit(validity, index)? {
                    continue;
                }
            }
            let seed = *h ^ self.name;
            *h = match self.kind {
                STRING => {
                    let offsets = offsets?;
                    let start = i32::from_le_bytes(offsets.get(4 * index..4 * index + 4)?.try_into().ok()?);
                    let end = i32::from_le_bytes(offsets.get(4 * index + 4..4 * index + 8)?.try_into().ok()?);
                    let value = data.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)?;
                    xxh3_64_with_seed(value, seed)
                }
                INT64 => xxh3_64_with_seed(data.get(8 * index..8 * index + 8)?, seed),
                INT32 => {
                    let value = i32::from_le_bytes(data.get(4 * index..4 * index + 4)?.try_into().ok()?);
                    xxh3_64_with_seed(&(value as i64).to_le_bytes(), seed)
                }
                FLOAT32 => {
                    let value = f32::from_le_bytes(data.get(4 * index..4 * index + 4)?.try_into().ok()?);
                    xxh3_64_with_seed(&(value as f64).to_le_bytes(), seed)
                }
                BOOL => xxh3_64_with_seed(&(bit(data, index)? as i64).to_le_bytes(), seed),
                _ => return None,
            };
        }
        Some(())
    }
}

/// `fingerprints(columns, out)`: for each of n rows, h = 0, then for each column in order where the row has a
/// value, h = XXH3-64(value, seed = h ^ XXH3-64(column name)); written as little-endian uint64 into `out` (n × 8
/// bytes). A value is a string's bytes, or 8 little-endian bytes (integers widened, float32 as float64, a
/// boolean as 0 or 1). A null leaves h as it was.
#[pyfunction]
fn fingerprints(py: Python<'_>, columns: Vec<Column>, out: PyBuffer<u8>) -> PyResult<()> {
    let mut out_view = Out::of(&out)?;
    let n = out_view.len / 8;
    let mut views = Vec::with_capacity(columns.len());
    for (name, kind, validity, offset, offsets, data) in &columns {
        if *kind > BOOL || (*kind == STRING) != offsets.is_some() {
            return Err(PyValueError::new_err(format!("fingerprints: column {name} has an unknown layout")));
        }
        views.push(ColumnView {
            name: xxh3_64(name.as_bytes()),
            kind: *kind,
            validity: validity.as_ref().map(Bytes::of).transpose()?,
            offset: *offset,
            offsets: offsets.as_ref().map(Bytes::of).transpose()?,
            data: Bytes::of(data)?,
        });
    }
    let done = py.detach(move || {
        let mut hashes = vec![0u64; n];
        for column in &views {
            column.fold(&mut hashes)?;
        }
        for (chunk, h) in out_view.slice().chunks_exact_mut(8).zip(hashes) {
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        Some(())
    });
    done.ok_or_else(|| PyValueError::new_err("fingerprints: a column's buffers hold fewer rows than the output"))
}

#[pymodule]
fn gamestream_native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(uuid_keys, module)?)?;
    module.add_function(wrap_pyfunction!(fingerprints, module)?)?;
    module.add_function(wrap_pyfunction!(newline_cuts, module)?)?;
    module.add_function(wrap_pyfunction!(crc32_partitions, module)?)?;
    module.add_function(wrap_pyfunction!(runs::merge_runs, module)?)?;
    module.add_function(wrap_pyfunction!(runs::bucket_starts, module)?)?;
    module.add_function(wrap_pyfunction!(runs::find_in_run, module)?)?;
    module.add_function(wrap_pyfunction!(decode::decode_lines, module)?)?;
    module.add_class::<validate::Validator>()?;
    module.add_class::<front::Front>()?;
    Ok(())
}

/// `newline_cuts(data, every, counted)`: where chunks of `every` lines end in `data`, a piece of a file read in
/// order. `counted`: the newlines seen since the last cut, in the pieces before this one. Returns the offsets in
/// `data` just after each `every`-th newline, and the newlines after the last of them (the next call's
/// `counted`). A loop the compiler vectorizes: several GB/s, where `bytes.count` makes ~2.
#[pyfunction]
fn newline_cuts(py: Python<'_>, data: PyBuffer<u8>, every: usize, counted: usize) -> PyResult<(Vec<usize>, usize)> {
    if every == 0 {
        return Err(PyValueError::new_err("newline_cuts: every must be at least 1"));
    }
    let view = Bytes::of(&data)?;
    Ok(py.detach(move || {
        let bytes = view.slice();
        let (mut cuts, mut seen, mut at) = (Vec::new(), counted, 0);
        while at < bytes.len() {
            // count whole blocks at once while the next cut is further than a block away
            let block = &bytes[at..(at + 4096).min(bytes.len())];
            let newlines: usize = block.chunks(255).map(|c| c.iter().map(|&b| (b == b'\n') as u8).sum::<u8>() as usize).sum();
            if seen + newlines < every {
                seen += newlines;
                at += block.len();
                continue;
            }
            for (i, &b) in block.iter().enumerate() {
                if b == b'\n' {
                    seen += 1;
                    if seen == every {
                        cuts.push(at + i + 1);
                        seen = 0;
                    }
                }
            }
            at += block.len();
        }
        (cuts, seen)
    }))
}

/// `crc32_partitions(offsets, data, partitions, out)`: for the n strings of an Arrow string array (`offsets`:
/// its n + 1 int32 offsets from the array's own offset on; `data`: its value buffer), zlib's CRC-32 of each
/// string's bytes modulo `partitions` (the log partition of a device id, `gamestream.log.partition_for`),
/// written as int32 into `out` (n × 4 bytes).
#[pyfunction]
fn crc32_partitions(
    py: Python<'_>,
    offsets: PyBuffer<u8>,
    data: PyBuffer<u8>,
    partitions: u32,
    out: PyBuffer<u8>,
) -> PyResult<()> {
    let (offsets_view, data_view) = (Bytes::of(&offsets)?, Bytes::of(&data)?);
    let mut out_view = Out::of(&out)?;
    let n = (offsets_view.len / 4).saturating_sub(1);
    if partitions == 0 || out_view.len != 4 * n {
        return Err(PyValueError::new_err("crc32_partitions: partitions must be at least 1, out hold n int32"));
    }
    let done = py.detach(move || {
        let (offsets, data, out) = (offsets_view.slice(), data_view.slice(), out_view.slice());
        for i in 0..n {
            let (start, end) = (offset_at(offsets, i), offset_at(offsets, i + 1));
            let value = data.get(start..end)?;
            let partition = (crc32fast::hash(value) % partitions) as i32;
            out[4 * i..4 * i + 4].copy_from_slice(&partition.to_le_bytes());
        }
        Some(())
    });
    done.ok_or_else(|| PyValueError::new_err("crc32_partitions: an offset lies outside the data"))
}
