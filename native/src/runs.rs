//! The deduplication state's sorted runs (`gamestream.process.identity.PartitionIds`): a run is a sorted array
//! of distinct int64 id keys with their fingerprints (int64) and days of arrival (int32), indexed by buckets of
//! the keys' top bits (`bucket_starts`), which makes a lookup a couple of cache misses however large the run.
//!
//! - `merge_runs`: two runs merged into one, in a single pass (an entry of the first run wins a tie).
//! - `bucket_starts`: where each bucket starts in a sorted run.
//! - `find_in_run`: for each key (sorted or not), where it would be in a run and whether it is there: a binary
//!   search inside its bucket, 32 keys advanced a step at a time so that their cache misses overlap.
//!
//! A key's bucket, with `bits` top bits: (key >> (64 - bits)) + 2^(bits - 1), an arithmetic shift of the signed
//! key, so the buckets run in key order from 0 to 2^bits - 1.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::{Bytes, Out};

/// The element count of a view of `len` bytes at `ptr` as an array of T, if it is one (whole and aligned).
fn elements<T>(ptr: usize, len: usize, what: &str) -> PyResult<usize> {
    let size = std::mem::size_of::<T>();
    if len % size != 0 || ptr % std::mem::align_of::<T>() != 0 {
        return Err(PyValueError::new_err(format!("{what}: not an aligned array of {size}-byte values")));
    }
    Ok(len / size)
}

fn typed<'a, T>(view: &Bytes, what: &str) -> PyResult<&'a [T]> {
    let n = elements::<T>(view.ptr as usize, view.len, what)?;
    Ok(if n == 0 { &[] } else { unsafe { std::slice::from_raw_parts(view.ptr as *const T, n) } })
}

fn typed_mut<'a, T>(view: &mut Out, what: &str) -> PyResult<&'a mut [T]> {
    let n = elements::<T>(view.ptr as usize, view.len, what)?;
    Ok(if n == 0 { &mut [] } else { unsafe { std::slice::from_raw_parts_mut(view.ptr as *mut T, n) } })
}

fn bucket(key: i64, bits: u32) -> usize {
    ((key >> (64 - bits)) + (1i64 << (bits - 1))) as usize
}

/// `merge_runs(a_keys, a_prints, a_days, b_keys, b_prints, b_days, keys, prints, days)`: runs a and b (each
/// sorted by key) merged by key into the outputs, which hold len(a) + len(b) entries; on equal keys a's entry
/// comes first. Keys and prints are int64 arrays, days int32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn merge_runs(
    py: Python<'_>,
    a_keys: PyBuffer<u8>,
    a_prints: PyBuffer<u8>,
    a_days: PyBuffer<u8>,
    b_keys: PyBuffer<u8>,
    b_prints: PyBuffer<u8>,
    b_days: PyBuffer<u8>,
    keys: PyBuffer<u8>,
    prints: PyBuffer<u8>,
    days: PyBuffer<u8>,
) -> PyResult<()> {
    let (ak, ap, ad) = (Bytes::of(&a_keys)?, Bytes::of(&a_prints)?, Bytes::of(&a_days)?);
    let (bk, bp, bd) = (Bytes::of(&b_keys)?, Bytes::of(&b_prints)?, Bytes::of(&b_days)?);
    let (mut ok, mut op, mut od) = (Out::of(&keys)?, Out::of(&prints)?, Out::of(&days)?);
    let (ak, ap, ad): (&[i64], &[i64], &[i32]) = (typed(&ak, "a keys")?, typed(&ap, "a prints")?, typed(&ad, "a days")?);
    let (bk, bp, bd): (&[i64], &[i64], &[i32]) = (typed(&bk, "b keys")?, typed(&bp, "b prints")?, typed(&bd, "b days")?);
    let (ok, op, od): (&mut [i64], &mut [i64], &mut [i32]) =
        (typed_mut(&mut ok, "keys")?, typed_mut(&mut op, "prints")?, typed_mut(&mut od, "days")?);
    let n = ak.len() + bk.len();
    if ap.len() != ak.len() || ad.len() != ak.len() || bp.len() != bk.len() || bd.len() != bk.len()
        || ok.len() != n || op.len() != n || od.len() != n
    {
        return Err(PyValueError::new_err("merge_runs: the arrays of a run, or the outputs, differ in length"));
    }
    py.detach(move || {
        let (mut i, mut j, mut out) = (0, 0, 0);
        while i < ak.len() && j < bk.len() {
            // without branches: which run gives the next entry is a coin toss for random keys
            let from_a = ak[i] <= bk[j];
            ok[out] = if from_a { ak[i] } else { bk[j] };
            op[out] = if from_a { ap[i] } else { bp[j] };
            od[out] = if from_a { ad[i] } else { bd[j] };
            i += from_a as usize;
            j += !from_a as usize;
            out += 1;
        }
        for (keys, prints, days, from) in [(ak, ap, ad, i), (bk, bp, bd, j)] {
            let rest = keys.len() - from;
            ok[out..out + rest].copy_from_slice(&keys[from..]);
            op[out..out + rest].copy_from_slice(&prints[from..]);
            od[out..out + rest].copy_from_slice(&days[from..]);
            out += rest;
        }
    });
    Ok(())
}

/// `bucket_starts(keys, bits, starts)`: for a sorted int64 run, where each of its 2^bits buckets starts, and
/// its end after the last (`starts`: 2^bits + 1 int64 values); returns the most keys one bucket holds.
#[pyfunction]
pub fn bucket_starts(py: Python<'_>, keys: PyBuffer<u8>, bits: u32, starts: PyBuffer<u8>) -> PyResult<usize> {
    let keys_view = Bytes::of(&keys)?;
    let mut starts_view = Out::of(&starts)?;
    let keys: &[i64] = typed(&keys_view, "keys")?;
    let starts: &mut [i64] = typed_mut(&mut starts_view, "starts")?;
    if !(1..=62).contains(&bits) || starts.len() != (1usize << bits) + 1 {
        return Err(PyValueError::new_err("bucket_starts: bits must be 1 to 62, and starts hold 2^bits + 1 values"));
    }
    Ok(py.detach(move || {
        let buckets = starts.len() - 1;
        let mut at = 0usize;
        for (b, start) in starts[..buckets].iter_mut().enumerate() {
            while at < keys.len() && bucket(keys[at], bits) < b {
                at += 1;
            }
            *start = at as i64;
        }
        starts[buckets] = keys.len() as i64;
        starts.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }))
}

/// `find_in_run(run, bits, starts, keys, at, hit)`: for each of `keys` (int64, any order), where it would be in
/// the sorted `run` (its lower bound, into `at`, int64) and whether it is there (`hit`, bytes of 0 or 1), found
/// in its bucket (`starts`: `bucket_starts` of the run with `bits`).
#[pyfunction]
pub fn find_in_run(
    py: Python<'_>,
    run: PyBuffer<u8>,
    bits: u32,
    starts: PyBuffer<u8>,
    keys: PyBuffer<u8>,
    at: PyBuffer<u8>,
    hit: PyBuffer<u8>,
) -> PyResult<()> {
    let (run_view, starts_view, keys_view) = (Bytes::of(&run)?, Bytes::of(&starts)?, Bytes::of(&keys)?);
    let (mut at_view, mut hit_view) = (Out::of(&at)?, Out::of(&hit)?);
    let run: &[i64] = typed(&run_view, "run")?;
    let starts: &[i64] = typed(&starts_view, "starts")?;
    let keys: &[i64] = typed(&keys_view, "keys")?;
    let at: &mut [i64] = typed_mut(&mut at_view, "at")?;
    let hit: &mut [u8] = typed_mut(&mut hit_view, "hit")?;
    if !(1..=62).contains(&bits) || starts.len() != (1usize << bits) + 1 || at.len() != keys.len()
        || hit.len() != keys.len()
    {
        return Err(PyValueError::new_err("find_in_run: the bucket starts or the outputs do not fit"));
    }
    // (starts outside the run are not looked for here, which would cost a pass over every bucket per call: the
    // indexing below is bounds-checked, so such a start panics rather than reads past the run)
    py.detach(move || {
        // Keys a block at a time, each block's binary searches advanced one step per round for all its keys:
        // the loads of a round are independent, so the processor overlaps their cache and TLB misses (in a run
        // of 10^8 keys nearly every load is both); one key searched to its end before the next would wait for
        // each of its misses in turn (5 times slower there).
        const BLOCK: usize = 32;
        for first in (0..keys.len()).step_by(BLOCK) {
            let block = &keys[first..(first + BLOCK).min(keys.len())];
            let mut base = [0usize; BLOCK];
            let mut size = [0usize; BLOCK];
            let mut widest = 0;
            for (j, &key) in block.iter().enumerate() {
                let b = bucket(key, bits);
                base[j] = starts[b] as usize;
                size[j] = (starts[b + 1] as usize).saturating_sub(base[j]);
                widest = widest.max(size[j]);
            }
            while widest > 1 {
                for (j, &key) in block.iter().enumerate() {
                    let half = size[j] / 2; // 0 once this key's range is down to one
                    if half > 0 {
                        base[j] = if run[base[j] + half - 1] < key { base[j] + half } else { base[j] };
                        size[j] -= half;
                    }
                }
                widest -= widest / 2;
            }
            for (j, &key) in block.iter().enumerate() {
                let lo = base[j] + (size[j] == 1 && run[base[j]] < key) as usize;
                at[first + j] = lo as i64;
                hit[first + j] = (lo < run.len() && run[lo] == key) as u8;
            }
        }
    });
    Ok(())
}
