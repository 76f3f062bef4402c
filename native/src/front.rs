//! The native front of the collector (`gamestream serve --front native`): the listening socket served in Rust,
//! with `POST /v1/events` answered here whenever the answer is a plain 200, and everything else handed, byte for
//! byte, to the Python app behind it.
//!
//! Per connection (a tokio task; one runtime thread by default):
//! 1. A request head is read under the head timer (`header_timeout_s`, from the connection's opening or its
//!    previous answer; an idle or trickling connection is closed, as `http_guard` closes it) and parsed.
//! 2. The **fast path** takes it only when every answer but 200 is ruled out up front: `POST /v1/events` over
//!    HTTP/1.1, a Content-Length within the body limit, no Transfer-Encoding, Expect, Sent-At or Upgrade, an
//!    Idempotency-Key (if any) of 1 to 200 ASCII characters, a content type and encoding the collector takes, a write key that matches (or none configured),
//!    the backlog under its bound (`set_refusing`), and the connection limit not passed. The body is read under
//!    the body timer (408 and a lingering close when it is late, as `http_guard` answers), gunzipped within the
//!    limit, and checked by the validator's kernel (`Validator::plan_body`): every event provably valid, or the
//!    request is not taken here. A taken request's records join the next group; one call into Python per group
//!    (`append`) makes the group durable in the log, and each request of it is then answered 200 with the
//!    answer the Python route gives, or 503 with Retry-After when the log refused the group (nothing stored). A
//!    request with an Idempotency-Key has its own item in the group, its key and answer stored with its records
//!    in the same transaction; a key used before gets the first answer back and stores nothing.
//! 3. Anything else — any refusal, any rejected event, another route, a head it cannot parse, over a limit — is
//!    **spliced**: the bytes read so far and the rest of the connection, both ways, go to the Python app (uvicorn
//!    with `http_guard`, on a Unix socket only this process can open), preceded by one line naming the client's
//!    address (`GSPEER <ip> <port>`), read by the protocol on that side. So every refusal, its words and its
//!    metrics come from the one place that decides them today.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, watch};

use crate::validate::{Request, Validator};

const MAX_HEADER_LINES: usize = 100; // `http_guard.MAX_HEADER_LINES`
const LINGER: Duration = Duration::from_secs(2); // `http_guard.LINGER_S`
const KEPT_BUFFER: usize = 64 * 1024;
const COUNTRIES_KEPT: usize = 4096; // `api.collector.COUNTRIES_KEPT`
const COUNTRIES_KEPT_FOR: Duration = Duration::from_secs(1);
const JSON_TYPES: &[&str] = &["application/json"]; // `log.envelope.JSON_TYPES`, `NDJSON_TYPES`
const NDJSON_TYPES: &[&str] = &["application/x-ndjson", "application/ndjson", "application/jsonl",
                                "application/x-jsonlines", "application/jsonlines"];

struct Config {
    upstream: String,
    keys: Vec<Vec<u8>>,
    max_body: usize,
    max_events: usize,
    max_header: usize,
    header_timeout: Duration,
    body_timeout: Duration,
    max_connections: usize,
    drain_max: usize,
    retry_after: u64,
    partitions: Option<u32>,
    record_limit: Option<usize>,
    max_idempotency_key: usize,
    /// the forwarding header the trusted proxies write, lower case (None: no proxy is trusted)
    forwarded_header: Option<String>,
}

/// A request taken by the fast path, waiting for its group to be durable.
struct Pending {
    records: Vec<(u32, Vec<u8>, usize)>,
    events: usize,
    /// its Idempotency-Key, stored with its records and `answer` in the group's transaction
    key: Option<String>,
    answer: Vec<u8>,
    started: Instant,
    reply: oneshot::Sender<Reply>,
}

/// A taken request's outcome: durable (None), or its key's first answer (Some: nothing stored); Err: the log
/// refused the group (the error's type name).
type Reply = Result<Option<Vec<u8>>, String>;

#[derive(Default)]
struct Queue {
    items: Vec<Pending>,
    closed: bool,
}

struct Shared {
    config: Config,
    validator: Py<Validator>,
    append: Py<PyAny>,
    country: Option<Py<PyAny>>,
    refusing: AtomicBool,
    open: AtomicUsize,
    queue: Mutex<Queue>,
    wake: Condvar,
    countries: Mutex<(Instant, HashMap<(IpAddr, Vec<u8>), Option<String>>)>,
    taken: AtomicU64,
    spliced: AtomicU64,
    /// requests taken and not yet answered
    busy: AtomicUsize,
}

/// Counts a request taken for as long as it is not answered.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a connection open for as long as it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

// ------------------------------------------------------------------------------------------------ the head
/// What the fast path needs of a head it takes.
struct Taken {
    head_len: usize,
    body_len: usize,
    gzip: bool,
    lines: bool,
    forwarded: Vec<u8>,
    key: Option<String>,
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// `value` without ASCII whitespace at either end (`<[u8]>::trim_ascii`, which needs Rust 1.80).
fn trimmed(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &value[start..end]
}

/// `api.access.presented_key`: X-API-Key, else `Authorization: Bearer <key>`; ASCII only (else not taken here).
fn presented_key<'a>(headers: &'a [httparse::Header<'a>]) -> Option<&'a [u8]> {
    if let Some(given) = header(headers, "x-api-key") {
        return Some(given);
    }
    let authorization = header(headers, "authorization")?;
    let space = authorization.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&authorization[..space], &authorization[space + 1..]);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| trimmed(token))
}

/// Constant-time equality of `given` with every key, as `ingest.auth.key_matches`.
fn key_matches(given: &[u8], keys: &[Vec<u8>]) -> bool {
    let mut matched = false;
    for key in keys {
        let mut difference = (given.len() != key.len()) as u8;
        for (i, byte) in given.iter().enumerate() {
            difference |= byte ^ key.get(i).copied().unwrap_or(!byte);
        }
        matched |= difference == 0;
    }
    !given.is_empty() && matched
}

impl Shared {
    /// The fast path's terms for a complete head (`request`, `head_len` bytes), or None: splice.
    fn take(&self, request: &httparse::Request, head_len: usize) -> Option<Taken> {
        let config = &self.config;
        if request.method != Some("POST") || request.path != Some("/v1/events") || request.version != Some(1) {
            return None;
        }
        if self.refusing.load(Ordering::Relaxed) || self.open.load(Ordering::SeqCst) > config.max_connections
            || config.partitions.is_none() {
            return None;
        }
        let headers = &*request.headers;
        let mut lengths = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length"));
        let length = lengths.next()?.value;
        if lengths.next().is_some() || length.is_empty() || length.len() > 12 || !length.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let body_len: usize = std::str::from_utf8(length).ok()?.parse().ok()?;
        if body_len > config.max_body {
            return None;
        }
        for refused in ["transfer-encoding", "expect", "sent-at", "upgrade"] {
            if header(headers, refused).is_some() {
                return None;
            }
        }
        // `routes.events._idempotency_key`: 1 to the limit's characters (ASCII here; anything else: the app)
        let key = match header(headers, "idempotency-key") {
            None => None,
            Some(key) if !key.is_empty() && key.len() <= config.max_idempotency_key && key.is_ascii() => {
                Some(String::from_utf8(key.to_vec()).ok()?)
            }
            Some(_) => return None,
        };
        if let Some(connection) = header(headers, "connection") {
            if !trimmed(connection).eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        }
        let lines = match header(headers, "content-type") {
            None => true, // sniffed: a JSON array is not cut here (`body_events`), anything else is NDJSON
            Some(value) => {
                let media = std::str::from_utf8(value).ok()?.split(';').next()?.trim().to_ascii_lowercase();
                if JSON_TYPES.contains(&media.as_str()) {
                    false
                } else if NDJSON_TYPES.contains(&media.as_str()) || media.is_empty() {
                    true
                } else {
                    return None;
                }
            }
        };
        let gzip = match header(headers, "content-encoding").map(trimmed) {
            None => false,
            Some(value) if value.eq_ignore_ascii_case(b"identity") => false,
            Some(value) if value.eq_ignore_ascii_case(b"gzip") => true,
            Some(_) => return None,
        };
        if !config.keys.is_empty() {
            let given = presented_key(headers)?;
            if !given.is_ascii() || !key_matches(given, &config.keys) {
                return None;
            }
        }
        let mut forwarded = Vec::new();
        if let Some(name) = &config.forwarded_header {
            for value in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value) {
                if !forwarded.is_empty() {
                    forwarded.push(b',');
                }
                forwarded.extend_from_slice(value);
            }
        }
        Some(Taken { head_len, body_len, gzip, lines, forwarded, key })
    }

    /// The client's country, looked up in Python (`Collector.country_for`) once a second per address.
    fn country(&self, peer: IpAddr, forwarded: &[u8]) -> Result<Option<String>, ()> {
        let Some(lookup) = &self.country else { return Ok(None) };
        let key = (peer, forwarded.to_vec());
        {
            let mut kept = self.countries.lock().unwrap();
            let now = Instant::now();
            if now >= kept.0 || kept.1.len() >= COUNTRIES_KEPT {
                kept.1.clear();
                kept.0 = now + COUNTRIES_KEPT_FOR;
            }
            if let Some(country) = kept.1.get(&key) {
                return Ok(country.clone());
            }
        }
        let country = Python::attach(|py| -> PyResult<Option<String>> {
            let forwarded = if forwarded.is_empty() && self.config.forwarded_header.is_none() {
                None
            } else {
                Some(PyBytes::new(py, forwarded))
            };
            lookup.call1(py, (peer.to_string(), forwarded))?.extract(py)
        }).map_err(|_| ())?;
        self.countries.lock().unwrap().1.insert(key, country.clone());
        Ok(country)
    }
}

/// Inflates one gzip member within `limit` bytes, as `envelope.gunzip` takes it; None for anything else
/// (not gzip, over the limit, cut off, data after the member): Python answers those.
fn gunzip(body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut decoder = flate2::bufread::GzDecoder::new(body);
    let mut out = Vec::with_capacity(body.len() * 4);
    (&mut decoder).take(limit as u64 + 1).read_to_end(&mut out).ok()?;
    if out.len() > limit || !decoder.into_inner().is_empty() {
        return None;
    }
    Some(out)
}

// ----------------------------------------------------------------------------------------------- answers
fn http_date() -> String {
    httpdate::fmt_http_date(SystemTime::now())
}

fn answer(status: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\ndate: {}\r\nserver: gamestream\r\ncontent-type: application/json\r\n\
                           content-length: {}\r\n{extra}\r\n", http_date(), body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// `{"error": message}` as `http_guard._error_body` writes it (json.dumps' separators).
fn guard_error(message: &str) -> Vec<u8> {
    format!("{{\"error\": {}}}", serde_json::to_string(message).unwrap()).into_bytes()
}

/// `{"error":message}` as Starlette's JSONResponse writes a `Refuse`.
fn refusal(message: &str) -> Vec<u8> {
    format!("{{\"error\":{}}}", serde_json::to_string(message).unwrap()).into_bytes()
}

/// Writes `bytes`, shuts our side for writing, and reads and discards what the client still sends for up to
/// `LINGER` (or `drain_max` bytes), so the answer is not lost to a reset (`http_guard._answer_and_linger`).
async fn answer_and_linger(mut stream: TcpStream, bytes: &[u8], drain_max: usize) {
    if stream.write_all(bytes).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut sink = vec![0u8; 16 * 1024];
    let mut discarded = 0;
    while discarded <= drain_max {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

// -------------------------------------------------------------------------------------------- connections
enum Next {
    Close,
    Splice,
}

async fn splice(shared: &Shared, mut client: TcpStream, peer: SocketAddr, read: &[u8]) {
    shared.spliced.fetch_add(1, Ordering::Relaxed);
    let Ok(mut app) = UnixStream::connect(&shared.config.upstream).await else { return };
    let mut first = format!("GSPEER {} {}\r\n", peer.ip(), peer.port()).into_bytes();
    first.extend_from_slice(read);
    if app.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr, mut stop: watch::Receiver<bool>) {
    let _open = Open(shared.clone());
    let _ = stream.set_nodelay(true);
    let config = &shared.config;
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let next = 'requests: loop {
        // 1. the head, under the head timer
        let deadline = tokio::time::Instant::now() + config.header_timeout;
        let taken = loop {
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_LINES];
                let mut request = httparse::Request::new(&mut headers);
                match request.parse(&buf) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        if head_len > config.max_header {
                            break 'requests Next::Splice; // 431 from the app
                        }
                        break shared.take(&request, head_len);
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= config.max_header => {}
                    _ => break 'requests Next::Splice, // too many lines, too long, malformed: the app answers
                }
            }
            if *stop.borrow() && buf.is_empty() {
                break 'requests Next::Close;
            }
            tokio::select! {
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => match read {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break 'requests Next::Close, // closed, failed, or the head timer: nobody to answer
                },
                _ = stop.changed(), if buf.is_empty() => break 'requests Next::Close,
            }
        };
        let Some(taken) = taken else { break Next::Splice };
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = Busy(&shared.busy);
        // 2. the body, under the body timer
        let end = taken.head_len + taken.body_len;
        buf.reserve(end.saturating_sub(buf.len())); // the body in as few reads as the socket allows
        let deadline = tokio::time::Instant::now() + config.body_timeout;
        while buf.len() < end {
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => break 'requests Next::Close,
                Err(_) => {
                    let message = format!("request body not received within {} s", format_seconds(config.body_timeout));
                    answer_and_linger(stream, &answer("408 Request Timeout", &guard_error(&message),
                                                      "connection: close\r\n"), config.drain_max).await;
                    return;
                }
            }
        }
        // 3. inflated, checked, grouped: or handed to the app as it came
        let received = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let started = Instant::now();
        let raw = &buf[taken.head_len..end];
        let inflated;
        let body = if taken.gzip {
            match gunzip(raw, config.max_body) {
                Some(data) => {
                    inflated = data;
                    &inflated[..]
                }
                None => break Next::Splice,
            }
        } else {
            raw
        };
        let Ok(country) = shared.country(peer.ip(), &taken.forwarded) else { break Next::Splice };
        let Ok(request) = Request::checked(received, None, config.partitions, country) else { break Next::Splice };
        let Some((events, records)) = shared.validator.get().plan_body(body, taken.lines, &request, config.max_events)
        else {
            break Next::Splice;
        };
        let (reply, answered) = oneshot::channel();
        // the route's answer (`ingest.collector.encode`), stored under the key when there is one
        let accepted = format!("{{\"accepted\":{events},\"rejected\":0,\"errors\":[]}}").into_bytes();
        {
            let mut queue = shared.queue.lock().unwrap();
            if queue.closed {
                break Next::Splice;
            }
            queue.items.push(Pending { records, events, key: taken.key, answer: accepted.clone(), started, reply });
        }
        shared.wake.notify_one();
        shared.taken.fetch_add(1, Ordering::Relaxed);
        let out = match answered.await {
            Ok(Ok(None)) => answer("200 OK", &accepted, ""),
            Ok(Ok(Some(first))) => answer("200 OK", &first, "idempotent-replayed: true\r\n"),
            Ok(Err(name)) => answer("503 Service Unavailable", &refusal(&format!(
                "the event log cannot take writes right now ({name}); nothing was stored, retry later")),
                &format!("retry-after: {}\r\n", config.retry_after)),
            Err(_) => return, // the committer is gone (stopping)
        };
        if stream.write_all(&out).await.is_err() {
            return;
        }
        buf.drain(..end);
        if buf.capacity() > KEPT_BUFFER && buf.len() <= KEPT_BUFFER {
            buf.shrink_to(KEPT_BUFFER); // an idle connection holds no more than this after a large body
        }
    };
    if let Next::Splice = next {
        splice(&shared, stream, peer, &buf).await;
    }
}

/// Seconds as Python's `:g` writes them (30.0 → "30", 0.5 → "0.5").
fn format_seconds(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds.fract() == 0.0 { format!("{}", seconds as i64) } else { format!("{seconds}") }
}

// ----------------------------------------------------------------------------------------------- the groups
/// The records of requests as few records: a partition's records joined by newlines within `limit` bytes
/// (`api.coalesce.merge`), partitions in order of first appearance.
fn merge<'a>(group: impl Iterator<Item = &'a Pending>, limit: Option<usize>) -> Vec<(u32, Vec<u8>, usize)> {
    let mut order: Vec<u32> = Vec::new();
    let mut by_partition: HashMap<u32, Vec<(&[u8], usize)>> = HashMap::new();
    for pending in group {
        for (partition, record, count) in &pending.records {
            by_partition.entry(*partition).or_insert_with(|| {
                order.push(*partition);
                Vec::new()
            }).push((record, *count));
        }
    }
    let mut out = Vec::new();
    for partition in order {
        let mut run: Vec<u8> = Vec::new();
        let mut events = 0;
        for (record, count) in &by_partition[&partition] {
            if events > 0 && limit.is_some_and(|limit| run.len() + 1 + record.len() > limit) {
                out.push((partition, std::mem::take(&mut run), events));
                events = 0;
            }
            if events > 0 {
                run.push(b'\n');
            }
            run.extend_from_slice(record);
            events += count;
        }
        out.push((partition, run, events));
    }
    out
}

/// The committer thread: each group of waiting requests made durable with one call into Python. The thread
/// keeps its Python thread state for its whole life (waiting with the GIL released): a thread state made and
/// dropped per group would cost its making, and lose the thread's `threading.local` (the log's connection).
fn commit_groups(shared: Arc<Shared>) {
    Python::attach(|py| loop {
        let group = py.detach(|| {
            let mut queue = shared.queue.lock().unwrap();
            while queue.items.is_empty() && !queue.closed {
                queue = shared.wake.wait(queue).unwrap();
            }
            std::mem::take(&mut queue.items)
        });
        if group.is_empty() {
            return;
        }
        // one item for the requests without a key (their records joined), one for each request with one (its key
        // and answer stored with its records, or its records not stored at all when the key was used before)
        let unkeyed = group.iter().filter(|p| p.key.is_none());
        let merged = merge(unkeyed.clone(), shared.config.record_limit);
        let ages: Vec<f64> = group.iter().map(|p| p.started.elapsed().as_secs_f64()).collect();
        let result = (|| -> PyResult<Vec<Reply>> {
            let items = PyList::empty(py);
            let records_of = |records: &[(u32, Vec<u8>, usize)]| -> PyResult<Bound<'_, PyList>> {
                let list = PyList::empty(py);
                for (partition, record, count) in records {
                    list.append((*partition, PyBytes::new(py, record), *count))?;
                }
                Ok(list)
            };
            if !merged.is_empty() {
                let events: usize = unkeyed.map(|p| p.events).sum();
                items.append((py.None(), py.None(), records_of(&merged)?, events))?;
            }
            for pending in group.iter().filter(|p| p.key.is_some()) {
                items.append((pending.key.as_deref(), PyBytes::new(py, &pending.answer), records_of(&pending.records)?,
                              pending.events))?;
            }
            // per item: None (stored), bytes (the key's first answer), str (the error that refused it)
            let outcomes: Vec<Bound<'_, PyAny>> = shared.append.call1(py, (items, ages))?.extract(py)?;
            outcomes.iter().map(|outcome| -> PyResult<Reply> {
                Ok(if outcome.is_none() {
                    Ok(None)
                } else if let Ok(first) = outcome.cast::<PyBytes>() {
                    Ok(Some(first.as_bytes().to_vec()))
                } else {
                    Err(outcome.extract::<String>()?)
                })
            }).collect()
        })();
        let outcomes: Vec<Reply> = result.unwrap_or_else(|error| {
            // the whole group refused (or the call failed): every item gets the error's type name
            let name = error.get_type(py).name().map(|name| name.to_string()).unwrap_or_else(|_| "Exception".into());
            vec![Err(name); usize::from(!merged.is_empty()) + group.iter().filter(|p| p.key.is_some()).count()]
        });
        let mut outcomes = outcomes.into_iter();
        let unkeyed_outcome = if merged.is_empty() { None } else { outcomes.next() };
        for pending in group {
            let reply = if pending.key.is_none() { unkeyed_outcome.clone() } else { outcomes.next() };
            // an item Python gave no outcome for is not known to be stored: 503, and the client retries
            let _ = pending.reply.send(reply.unwrap_or_else(|| Err("Exception".into())));
        }
    })
}

// ----------------------------------------------------------------------------------------------- Python API
/// `Front(listener_fd, upstream, validator, append, country, *, keys, max_body_bytes, max_events,
/// max_header_bytes, header_timeout_s, body_timeout_s, max_connections, drain_max_bytes, retry_after_s,
/// partitions, record_limit, max_idempotency_key, forwarded_header)`: see the module's doc. `append(items, ages)`
/// makes a group durable in one go — each item `(key, answer, [(partition, record, events)], events)`, key and
/// answer None for the requests without an Idempotency-Key — and gives back, item by item, None (stored), the
/// answer stored under the key before (bytes: nothing stored) or the type name of the error that refused it
/// (str: nothing of it stored), raising when the log refuses the whole group; `ages` are the seconds each
/// request has waited. `country(ip, forwarded)` gives the client's country or None.
#[pyclass(module = "gamestream_native")]
pub struct Front {
    shared: Arc<Shared>,
    listener: Mutex<Option<std::net::TcpListener>>,
    stop: watch::Sender<bool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

#[pymethods]
impl Front {
    #[new]
    #[pyo3(signature = (listener_fd, upstream, validator, append, country, *, keys, max_body_bytes, max_events,
                        max_header_bytes, header_timeout_s, body_timeout_s, max_connections, drain_max_bytes,
                        retry_after_s, partitions, record_limit, max_idempotency_key, forwarded_header))]
    #[allow(clippy::too_many_arguments)]
    fn new(listener_fd: i32, upstream: String, validator: Py<Validator>, append: Py<PyAny>, country: Option<Py<PyAny>>,
           keys: Vec<Vec<u8>>, max_body_bytes: usize, max_events: usize, max_header_bytes: usize,
           header_timeout_s: f64, body_timeout_s: f64, max_connections: usize, drain_max_bytes: usize,
           retry_after_s: u64, partitions: Option<u32>, record_limit: Option<usize>, max_idempotency_key: usize,
           forwarded_header: Option<String>) -> PyResult<Self> {
        if !(header_timeout_s > 0.0 && body_timeout_s > 0.0) {
            return Err(PyValueError::new_err("timeouts must be positive"));
        }
        // SAFETY: the caller's socket is open for the call; we keep a duplicate of our own
        let fd: OwnedFd = unsafe { BorrowedFd::borrow_raw(listener_fd) }.try_clone_to_owned()?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        let config = Config {
            upstream, keys, max_body: max_body_bytes, max_events, max_header: max_header_bytes,
            header_timeout: Duration::from_secs_f64(header_timeout_s),
            body_timeout: Duration::from_secs_f64(body_timeout_s), max_connections, drain_max: drain_max_bytes,
            retry_after: retry_after_s, partitions, record_limit, max_idempotency_key,
            forwarded_header: forwarded_header.map(|h| h.to_ascii_lowercase()),
        };
        let shared = Arc::new(Shared {
            config, validator, append, country, refusing: AtomicBool::new(false), open: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()), wake: Condvar::new(),
            countries: Mutex::new((Instant::now(), HashMap::new())), taken: AtomicU64::new(0),
            spliced: AtomicU64::new(0), busy: AtomicUsize::new(0),
        });
        let (stop, _) = watch::channel(false);
        Ok(Front { shared, listener: Mutex::new(Some(listener)), stop, threads: Mutex::new(Vec::new()) })
    }

    /// Starts serving: the runtime's thread (accepting and serving connections) and the committer's.
    fn start(&self) -> PyResult<()> {
        let listener = self.listener.lock().unwrap().take()
            .ok_or_else(|| PyRuntimeError::new_err("the front was started already"))?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let shared = self.shared.clone();
        let stop = self.stop.subscribe();
        let serving = std::thread::Builder::new().name("front".into()).spawn(move || {
            runtime.block_on(serve(shared, listener, stop));
        })?;
        let shared = self.shared.clone();
        let committing = std::thread::Builder::new().name("front-commit".into())
            .spawn(move || commit_groups(shared))?;
        self.threads.lock().unwrap().extend([serving, committing]);
        Ok(())
    }

    /// While true (the backlog over its bound), no request is taken here: the app answers 503.
    fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::Relaxed);
    }

    /// Connections open now (taken and spliced): the connection limit counts these.
    fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// `(requests taken, connections spliced)` so far.
    fn counts(&self) -> (u64, u64) {
        (self.shared.taken.load(Ordering::Relaxed), self.shared.spliced.load(Ordering::Relaxed))
    }

    /// Stops accepting and closes idle connections; waits for up to `timeout_s` until every request taken here
    /// is answered, then stops the committer once its last group is. Spliced connections end when the app
    /// behind them stops.
    fn stop(&self, py: Python<'_>, timeout_s: f64) {
        let _ = self.stop.send(true);
        let shared = self.shared.clone();
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        py.detach(move || {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
            while shared.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            shared.queue.lock().unwrap().closed = true;
            shared.wake.notify_all();
            for thread in threads.into_iter().skip(1) {
                let _ = thread.join(); // the committer; the runtime's thread ends with the last spliced connection
            }
        });
    }
}

async fn serve(shared: Arc<Shared>, listener: std::net::TcpListener, mut stop: watch::Receiver<bool>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                shared.open.fetch_add(1, Ordering::SeqCst);
                tasks.spawn(connection(shared.clone(), stream, peer, stop.clone()));
            }
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}
