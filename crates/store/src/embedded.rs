//! Single-node backend: the whole dataset in memory, made durable by a write-ahead log.
//!
//! Layout of the data directory:
//! - `LOCK`: held with `flock` while a store has the directory open.
//! - `snapshot`: the full dataset at some revision S (absent until the first log rotation).
//! - `wal`: records of the transactions after S (it may also start with records <= S when a
//!   crash hit between writing a snapshot and starting a new log; those are skipped).
//!
//! One writer thread owns the log. It takes every queued transaction at once (group commit),
//! evaluates them in order against memory plus the not-yet-applied effects of the earlier ones,
//! appends their records, calls `fdatasync` once, and only then applies them to memory and
//! answers. A write is therefore acknowledged only once it is on disk. The log is zero-filled
//! ahead of the writes, so a sync need not commit a new file size; zeros after the last
//! record mark the log's end.
//!
//! Log record: `u32 payload length | u32 CRC32 of payload | payload`, little endian. Payload:
//! `u8 format | i64 revision | i64 first revision of its group commit | u32 op count | ops`,
//! an op being `u8 kind | u32 key length | key | (puts) u32 value length | value | (put with
//! lease) i64 lease`.
//!
//! Leases live in memory only. A key written with a lease is marked so in the log and the
//! snapshot; opening the store deletes every such key in one write, as if its lease had
//! expired with the process that held it.

use crate::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch, WatchEvent,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// File names inside the data directory (public so tests can damage them on purpose).
pub const WAL_FILE: &str = "wal";
pub const SNAPSHOT_FILE: &str = "snapshot";
pub const LOCK_FILE: &str = "LOCK";

/// How long opening waits for a lock that is about to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const TMP_SUFFIX: &str = ".tmp";

/// Largest transaction (keys + values) accepted; keeps one record well inside a `u32` length.
pub const MAX_TXN_BYTES: usize = 64 << 20;
/// Bound for decoding lengths read from disk, so garbage cannot make us allocate wildly.
const MAX_RECORD_BYTES: usize = MAX_TXN_BYTES + (4 << 20);

const RECORD_HEADER: usize = 8;
const RECORD_FORMAT: u8 = 1;
const MIN_PAYLOAD: usize = 1 + 8 + 8 + 4;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_PUT_LEASE: u8 = 3;
/// How often expired leases are looked for.
const LEASE_CHECK: Duration = Duration::from_millis(100);

/// Snapshot without lease marks (read only).
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"ISTHSNP1";
/// Each entry also carries its lease (0: none).
const SNAPSHOT_MAGIC: &[u8; 8] = b"ISTHSNP2";
const SNAPSHOT_TRAILER: usize = 8 + 4;

/// Transactions taken into one group commit at most.
const MAX_GROUP_TXNS: usize = 4096;
/// Log preallocation step bounds.
const PREALLOC_MIN: u64 = 1 << 20;
const PREALLOC_MAX: u64 = 8 << 20;
/// Payload bytes after which a group commit stops taking more (bounds the writer's buffer).
const MAX_GROUP_BYTES: usize = 64 << 20;
/// Events per watch message (a transaction is never split, so one may exceed it).
const MAX_WATCH_BATCH_EVENTS: usize = 1000;

/// Tuning knobs; [`Default`] suits production.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Events kept in memory for watches that start in the past.
    pub history_events: usize,
    /// Bytes (keys + values) of events kept in memory for watches.
    pub history_bytes: usize,
    /// Log size that triggers a snapshot and a fresh log.
    pub snapshot_after_bytes: u64,
    /// Messages buffered per watcher before the watcher's own task waits for the reader.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_events: 100_000,
            history_bytes: 64 << 20,
            snapshot_after_bytes: 64 << 20,
            watch_buffer: 64,
        }
    }
}

/// The embedded, single-node store. Dropping the last handle stops the writer thread and
/// releases the directory lock.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// For the lease reaper, which must not keep the store alive.
    me: Weak<EmbeddedStore>,
    requests: Option<std_mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    rev_rx: watch::Receiver<Revision>,
    watch_buffer: usize,
}

struct Shared {
    state: RwLock<State>,
    /// Live leases. The writer checks puts against it; expiry and revocation go through the
    /// writer so they are ordered with the transactions.
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    reaper_started: AtomicBool,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

fn lease_table(s: &Shared) -> std::sync::MutexGuard<'_, HashMap<LeaseId, LeaseState>> {
    s.leases.lock().unwrap_or_else(PoisonError::into_inner)
}

struct State {
    data: BTreeMap<String, KeyValue>,
    /// Keys written with a lease, and which.
    leased: HashMap<String, LeaseId>,
    revision: Revision,
    /// Every revision from the front's up to `revision`, one entry per revision.
    history: VecDeque<HistEntry>,
    history_events: usize,
    history_bytes: usize,
    limit_events: usize,
    limit_bytes: usize,
}

struct HistEntry {
    revision: Revision,
    events: Vec<Event>,
    bytes: usize,
}

/// Work for the writer thread, in arrival order.
enum Request {
    Txn(TxnRequest),
    // Through the writer so it waits behind a running snapshot (which holds the state's read
    // lock) instead of blocking every reader behind its write-lock attempt.
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Ends a lease (expired, or revoked when `force`) and deletes its keys in one txn.
    EndLease {
        lease: LeaseId,
        force: bool,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
}

impl Request {
    fn bytes(&self) -> usize {
        match self {
            Request::Txn(t) => t.bytes,
            Request::Compact { .. } | Request::EndLease { .. } => 0,
        }
    }
}

struct TxnRequest {
    compares: Vec<Compare>,
    ops: Vec<Op>,
    /// Key and value bytes of the ops.
    bytes: usize,
    reply: oneshot::Sender<Result<TxnResult>>,
}

fn read_lock(l: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    // Nothing under this lock can panic halfway through an update; do not turn a poisoned
    // lock into a second panic.
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock(l: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn new(opts: &EmbeddedOptions) -> Self {
        State {
            data: BTreeMap::new(),
            leased: HashMap::new(),
            revision: 0,
            history: VecDeque::new(),
            history_events: 0,
            history_bytes: 0,
            limit_events: opts.history_events,
            limit_bytes: opts.history_bytes,
        }
    }

    /// Oldest revision a watch may start from.
    fn compact_revision(&self) -> Revision {
        self.history.front().map_or(self.revision + 1, |e| e.revision)
    }

    /// `leases[i]` is the lease event `i` attached its key to (0: none).
    fn apply(&mut self, revision: Revision, events: Vec<Event>, leases: Vec<LeaseId>) {
        for (e, lease) in events.iter().zip(leases) {
            match e.kind {
                EventKind::Put => {
                    self.data.insert(e.kv.key.clone(), e.kv.clone());
                    if lease > 0 {
                        self.leased.insert(e.kv.key.clone(), lease);
                    } else {
                        self.leased.remove(&e.kv.key);
                    }
                }
                EventKind::Delete => {
                    self.data.remove(&e.kv.key);
                    self.leased.remove(&e.kv.key);
                }
            }
        }
        self.revision = revision;
        let bytes = events.iter().map(|e| e.kv.key.len() + e.kv.value.len()).sum();
        self.history_events += events.len();
        self.history_bytes += bytes;
        self.history.push_back(HistEntry {
            revision,
            events,
            bytes,
        });
        // Keep the newest revision even if it alone is over the limits, so a watcher that is
        // caught up never sees its next revision vanish.
        while (self.history_events > self.limit_events || self.history_bytes > self.limit_bytes)
            && self.history.len() > 1
        {
            self.pop_history();
        }
    }

    fn pop_history(&mut self) {
        if let Some(old) = self.history.pop_front() {
            self.history_events -= old.events.len();
            self.history_bytes -= old.bytes;
        }
    }
}

fn compare_key(c: &Compare) -> &str {
    match c {
        Compare::Absent(k) | Compare::Exists(k) | Compare::ModRevision(k, _) => k,
    }
}

fn compare_holds(c: &Compare, current: Option<&KeyValue>) -> bool {
    match c {
        Compare::Absent(_) => current.is_none(),
        Compare::Exists(_) => current.is_some(),
        Compare::ModRevision(_, r) => current.is_some_and(|kv| kv.mod_revision == *r),
    }
}

/// The value of `key` as seen by a transaction inside a group commit: earlier transactions of
/// the group (in `overlay`, `None` = deleted) shadow the applied state.
fn lookup<'a>(
    overlay: &'a HashMap<String, Option<KeyValue>>,
    data: &'a BTreeMap<String, KeyValue>,
    key: &str,
) -> Option<&'a KeyValue> {
    match overlay.get(key) {
        Some(v) => v.as_ref(),
        None => data.get(key),
    }
}

/// Events a transaction's ops produce at `rev`, and the lease of each (0: none); deletes of
/// absent keys produce none.
fn txn_events(
    rev: Revision,
    ops: Vec<Op>,
    overlay: &HashMap<String, Option<KeyValue>>,
    data: &BTreeMap<String, KeyValue>,
) -> (Vec<Event>, Vec<LeaseId>) {
    let mut events = Vec::with_capacity(ops.len());
    let mut leases = Vec::with_capacity(ops.len());
    for op in ops {
        let prev = lookup(overlay, data, op.key());
        let (op, lease) = match op {
            Op::PutWithLease { key, value, lease } => (Op::Put { key, value }, lease),
            op => (op, 0),
        };
        match op {
            Op::PutWithLease { .. } => unreachable!("converted above"),
            Op::Put { key, value } => {
                leases.push(lease);
                let (create_revision, version) = prev.map_or((rev, 1), |p| (p.create_revision, p.version + 1));
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        create_revision,
                        mod_revision: rev,
                        version,
                    },
                });
            }
            Op::Delete { key } => {
                if prev.is_some() {
                    leases.push(0);
                    events.push(Event {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key,
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: rev,
                            version: 0,
                        },
                    });
                }
            }
        }
    }
    (events, leases)
}

/// Checks shared by both backends: etcd refuses the same cases. Returns the key and value
/// bytes of `ops`.
pub(crate) fn validate_txn(compares: &[Compare], ops: &[Op], max_bytes: usize) -> Result<usize> {
    let mut seen = HashSet::with_capacity(ops.len());
    let mut bytes = 0usize;
    for op in ops {
        let key = op.key();
        if key.is_empty() {
            return Err(StoreError::Invalid("empty key".into()));
        }
        if !seen.insert(key) {
            return Err(StoreError::Invalid(format!("key {key:?} appears twice in one txn")));
        }
        bytes += key.len();
        match op {
            Op::Put { value, .. } => bytes += value.len(),
            Op::PutWithLease { value, lease, .. } => {
                if *lease <= 0 {
                    return Err(StoreError::Invalid(format!("invalid lease id {lease}")));
                }
                bytes += value.len();
            }
            Op::Delete { .. } => {}
        }
    }
    if bytes > max_bytes {
        return Err(StoreError::Invalid(format!(
            "txn of {bytes} bytes exceeds the limit of {max_bytes}"
        )));
    }
    if compares.iter().any(|c| compare_key(c).is_empty()) {
        return Err(StoreError::Invalid("empty key in compare".into()));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn encode_record(out: &mut Vec<u8>, revision: Revision, group_start: Revision, events: &[Event], leases: &[LeaseId]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER]);
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&group_start.to_le_bytes());
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for (i, e) in events.iter().enumerate() {
        let key = e.kv.key.as_bytes();
        let lease = leases.get(i).copied().unwrap_or(0);
        match e.kind {
            EventKind::Put => {
                out.push(if lease > 0 { OP_PUT_LEASE } else { OP_PUT });
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
                out.extend_from_slice(&(e.kv.value.len() as u32).to_le_bytes());
                out.extend_from_slice(&e.kv.value);
                if lease > 0 {
                    out.extend_from_slice(&lease.to_le_bytes());
                }
            }
            EventKind::Delete => {
                out.push(OP_DELETE);
                out.extend_from_slice(&(key.len() as u32).to_le_bytes());
                out.extend_from_slice(key);
            }
        }
    }
    let payload_len = (out.len() - start - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Bounds-checked little-endian reader over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_RECORD_BYTES {
            return None;
        }
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

struct LogRecord {
    revision: Revision,
    group_start: Revision,
    ops: Vec<Op>,
}

fn decode_payload(p: &[u8]) -> Option<LogRecord> {
    let mut r = Reader::new(p);
    if r.u8()? != RECORD_FORMAT {
        return None;
    }
    let revision = r.i64()?;
    let group_start = r.i64()?;
    let n = r.u32()? as usize;
    if revision < 1 || group_start < 1 || group_start > revision || n == 0 {
        return None;
    }
    // Each op takes at least 5 bytes; refuse counts the payload cannot hold.
    let mut ops = Vec::with_capacity(n.min(p.len() / 5));
    for _ in 0..n {
        match r.u8()? {
            OP_PUT => {
                let key = r.string()?;
                let value = r.bytes()?.to_vec();
                ops.push(Op::Put { key, value });
            }
            OP_PUT_LEASE => {
                let key = r.string()?;
                let value = r.bytes()?.to_vec();
                let lease = r.i64()?;
                if lease <= 0 {
                    return None;
                }
                ops.push(Op::PutWithLease { key, value, lease });
            }
            OP_DELETE => ops.push(Op::Delete { key: r.string()? }),
            _ => return None,
        }
    }
    r.done().then_some(LogRecord {
        revision,
        group_start,
        ops,
    })
}

/// Parses the record at `off`; `Err` says why it is not a valid record.
fn parse_record(buf: &[u8], off: usize) -> std::result::Result<(LogRecord, usize), &'static str> {
    let header = buf.get(off..off + RECORD_HEADER).ok_or("incomplete record header")?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(MIN_PAYLOAD..=MAX_RECORD_BYTES).contains(&len) {
        return Err("implausible record length");
    }
    let start = off + RECORD_HEADER;
    let payload = buf.get(start..start + len).ok_or("incomplete record")?;
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch");
    }
    let rec = decode_payload(payload).ok_or("undecodable record")?;
    Ok((rec, start + len))
}

/// The revision a damaged record at `off` claims, if its payload gets that far (unverified).
fn claimed_revision(buf: &[u8], off: usize) -> Option<Revision> {
    let start = off.checked_add(RECORD_HEADER + 1)?;
    let b = buf.get(start..start.checked_add(8)?)?;
    let r = i64::from_le_bytes(b.try_into().ok()?);
    (r >= 1).then_some(r)
}

/// How many bytes the damaged record at `off` spans: as far as its header's length says when
/// that is plausible, else up to the zero-filled (never written) space after it.
fn damaged_record_len(buf: &[u8], off: usize) -> usize {
    let rest = buf.len() - off;
    let header_len = buf
        .get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(|b| u32::from_le_bytes(b) as usize)
        .filter(|l| (MIN_PAYLOAD..=MAX_RECORD_BYTES).contains(l));
    match header_len {
        Some(l) => (RECORD_HEADER + l).min(rest),
        None => buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1 - off),
    }
}

/// After a bad record at `off` whose group commit started at or before `torn_group`, is there
/// a valid record from a *later* group commit? Such a record was written after the damaged
/// one had been synced and acknowledged, so the damage is not an unacknowledged torn tail.
fn later_group_after(buf: &[u8], off: usize, torn_group: Revision) -> Option<usize> {
    (off + 1..buf.len().saturating_sub(RECORD_HEADER + MIN_PAYLOAD - 1))
        .find(|&pos| matches!(parse_record(buf, pos), Ok((rec, _)) if rec.group_start > torn_group))
}

// ---------------------------------------------------------------------------------------------
// Snapshot

struct SnapshotWriter {
    w: BufWriter<File>,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl SnapshotWriter {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.w.write_all(bytes)
    }
    fn put_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(&(bytes.len() as u32).to_le_bytes())?;
        self.put(bytes)
    }
}

/// Writes the dataset to `snapshot` atomically (tmp + fsync + rename + fsync dir); returns its
/// size. Layout: magic | revision | count | entries | u64 payload length | u32 CRC32.
fn write_snapshot(dir: &Path, state: &State) -> io::Result<u64> {
    let tmp = dir.join(format!("{SNAPSHOT_FILE}{TMP_SUFFIX}"));
    let file = private_file().create(true).truncate(true).write(true).open(&tmp)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(SNAPSHOT_MAGIC)?;
    let mut sw = SnapshotWriter {
        w,
        hasher: crc32fast::Hasher::new(),
        len: 0,
    };
    sw.put(&state.revision.to_le_bytes())?;
    sw.put(&(state.data.len() as u64).to_le_bytes())?;
    for kv in state.data.values() {
        sw.put_bytes(kv.key.as_bytes())?;
        sw.put_bytes(&kv.value)?;
        sw.put(&kv.create_revision.to_le_bytes())?;
        sw.put(&kv.mod_revision.to_le_bytes())?;
        sw.put(&kv.version.to_le_bytes())?;
        sw.put(&state.leased.get(&kv.key).copied().unwrap_or(0).to_le_bytes())?;
    }
    let SnapshotWriter { mut w, hasher, len } = sw;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&hasher.finalize().to_le_bytes())?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    sync_dir(dir)?;
    Ok(SNAPSHOT_MAGIC.len() as u64 + len + SNAPSHOT_TRAILER as u64)
}

fn load_snapshot(bytes: &[u8], state: &mut State) -> Result<()> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("snapshot: {why}"));
    if bytes.len() < SNAPSHOT_MAGIC.len() + SNAPSHOT_TRAILER {
        return Err(corrupt("bad header"));
    }
    let with_leases = if bytes.starts_with(SNAPSHOT_MAGIC) {
        true
    } else if bytes.starts_with(SNAPSHOT_MAGIC_V1) {
        false
    } else {
        return Err(corrupt("bad header"));
    };
    let payload = &bytes[SNAPSHOT_MAGIC.len()..bytes.len() - SNAPSHOT_TRAILER];
    let mut trailer = Reader::new(&bytes[bytes.len() - SNAPSHOT_TRAILER..]);
    let (len, crc) = (trailer.u64(), trailer.u32());
    if len != Some(payload.len() as u64) {
        return Err(corrupt("length mismatch"));
    }
    if crc != Some(crc32fast::hash(payload)) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader::new(payload);
    let revision = r.i64().ok_or_else(|| corrupt("truncated"))?;
    let count = r.u64().ok_or_else(|| corrupt("truncated"))?;
    for _ in 0..count {
        let entry = (|| {
            let key = r.string()?;
            let value = r.bytes()?.to_vec();
            let (create_revision, mod_revision, version) = (r.i64()?, r.i64()?, r.i64()?);
            let lease = if with_leases { r.i64()? } else { 0 };
            let kv = KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
                version,
            };
            Some((kv, lease))
        })()
        .ok_or_else(|| corrupt("bad entry"))?;
        let (entry, lease) = entry;
        if entry.mod_revision > revision || entry.create_revision > entry.mod_revision || lease < 0 {
            return Err(corrupt("entry revision out of range"));
        }
        if lease > 0 {
            state.leased.insert(entry.key.clone(), lease);
        }
        state.data.insert(entry.key.clone(), entry);
    }
    if !r.done() || revision < 0 {
        return Err(corrupt("trailing bytes or bad revision"));
    }
    state.revision = revision;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Files

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The store holds the token signing key and password hashes: its directory is the owner's
/// alone (0700), whatever the umask, and one made by an older version is tightened on open.
fn make_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    if fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    for name in [SNAPSHOT_FILE, WAL_FILE, LOCK_FILE] {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Options for a file only the owner may read (0600).
fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = private_file()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    // A store closing right now (its last handle dropped on another thread), or a child
    // process between fork and exec that still shares a just-closed descriptor, holds the
    // lock for a moment: look again for a short while before calling the directory taken.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let rc = loop {
        // SAFETY: flock only reads the descriptor number of a file we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        let busy = rc != 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if !busy || std::time::Instant::now() >= deadline {
            break rc;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(StoreError::Unavailable(format!(
                "data directory {} is locked: another store (this or another process) has it \
                 open (lock file {})",
                dir.display(),
                path.display()
            )));
        }
        return Err(err.into());
    }
    // The pid is only a hint for humans; the flock is what excludes.
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Replays the log onto `state`; returns the length of its valid prefix. A damaged end that
/// only holds the last, unacknowledged group commit is cut off; damage followed by a later
/// group commit is corruption.
fn replay_log(buf: &[u8], state: &mut State) -> Result<usize> {
    let empty = HashMap::new();
    let mut off = 0;
    let mut prev: Option<Revision> = None;
    while off < buf.len() {
        let (rec, next) = match parse_record(buf, off) {
            Ok(r) => r,
            Err(why) => {
                if buf[off..].iter().all(|&b| b == 0) {
                    // Preallocated space never written to: the clean end of the log.
                    return Ok(off);
                }
                // The damaged record belongs to a group that started at the latest at the
                // revision after the last good record.
                let torn_group = prev.unwrap_or(state.revision) + 1;
                if let Some(pos) = later_group_after(buf, off, torn_group) {
                    return Err(StoreError::Corrupt(format!(
                        "log {why} at offset {off}, followed by a valid later record at offset \
                         {pos}"
                    )));
                }
                // A write cut short by a crash was never acknowledged, but a record damaged
                // after its sync was: the log cannot tell which, so say what is known. The
                // record is the one after the last good one.
                let dropped = damaged_record_len(buf, off);
                let revision = torn_group;
                let claimed = claimed_revision(buf, off)
                    .filter(|r| *r != revision)
                    .map(|r| format!("; its damaged header says {r}"))
                    .unwrap_or_default();
                if revision <= state.revision {
                    warn!(
                        offset = off,
                        revision,
                        dropped_bytes = dropped,
                        reason = why,
                        "dropping the damaged end of the store log: record at offset {off} \
                         (revision {revision}{claimed}, already in the snapshot), {dropped} bytes \
                         dropped; nothing is lost"
                    );
                } else {
                    warn!(
                        offset = off,
                        revision,
                        dropped_bytes = dropped,
                        reason = why,
                        "dropping the damaged last record of the store log: record at offset \
                         {off} (revision {revision}{claimed}), {dropped} bytes dropped; the store \
                         opens at revision {}. If that write had been acknowledged before the \
                         damage, it is lost",
                        revision - 1
                    );
                }
                return Ok(off);
            }
        };
        if let Some(p) = prev {
            if rec.revision != p + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log record at offset {off} has revision {} after {p}",
                    rec.revision
                )));
            }
        }
        if rec.revision > state.revision {
            if rec.revision != state.revision + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log starts at revision {} but the snapshot ends at {}",
                    rec.revision, state.revision
                )));
            }
            let n_ops = rec.ops.len();
            let (events, leases) = txn_events(rec.revision, rec.ops, &empty, &state.data);
            if events.len() != n_ops {
                return Err(StoreError::Corrupt(format!(
                    "log record at offset {off} deletes a key that does not exist"
                )));
            }
            state.apply(rec.revision, events, leases);
        }
        prev = Some(rec.revision);
        off = next;
    }
    Ok(off)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with default options. Blocking I/O: it
    /// reads the whole snapshot and log.
    pub fn open(dir: &Path) -> Result<Arc<EmbeddedStore>> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    pub fn open_with(dir: &Path, opts: EmbeddedOptions) -> Result<Arc<EmbeddedStore>> {
        make_private_dir(dir)?;
        let lock = lock_dir(dir)?;
        for name in [SNAPSHOT_FILE, WAL_FILE] {
            let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
            if tmp.exists() {
                fs::remove_file(&tmp)?;
            }
        }

        let mut state = State::new(&opts);
        let snap_path = dir.join(SNAPSHOT_FILE);
        let mut snapshot_len = 0;
        if snap_path.exists() {
            let bytes = fs::read(&snap_path)?;
            snapshot_len = bytes.len() as u64;
            load_snapshot(&bytes, &mut state)?;
        }
        let snapshot_rev = state.revision;

        let wal_path = dir.join(WAL_FILE);
        let created = !wal_path.exists();
        if created && snap_path.exists() {
            // The log is only ever replaced by rename, never removed: a snapshot without one
            // means the writes after the snapshot were lost outside the store.
            return Err(StoreError::Corrupt(format!(
                "{} has a snapshot (revision {snapshot_rev}) but no log ({WAL_FILE}): the writes \
                 after the snapshot are missing; refusing to open it. Restore the log, or move \
                 the snapshot away to start empty",
                dir.display()
            )));
        }
        let mut wal = private_file()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&wal_path)?;
        if created {
            sync_dir(dir)?;
        }
        let mut buf = Vec::new();
        wal.read_to_end(&mut buf)?;
        let valid = replay_log(&buf, &mut state)?;
        if valid < buf.len() {
            // Drops a torn tail and unused preallocated space alike; writes reallocate.
            wal.set_len(valid as u64)?;
            wal.sync_all()?;
        }
        drop(buf);
        info!(
            dir = %dir.display(),
            revision = state.revision,
            snapshot_revision = snapshot_rev,
            keys = state.data.len(),
            "opened embedded store"
        );

        // Leases died with the process that held them: their keys go now, in one write.
        let mut orphaned: Vec<String> = state.leased.keys().cloned().collect();
        orphaned.sort();
        let revision = state.revision;
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            leases: Mutex::new(HashMap::new()),
            reaper_started: AtomicBool::new(false),
        });
        let (rev_tx, rev_rx) = watch::channel(revision);
        let (req_tx, req_rx) = std_mpsc::channel();
        let mut writer = Writer {
            shared: shared.clone(),
            dir: dir.to_path_buf(),
            wal,
            wal_len: valid as u64,
            wal_alloc: valid as u64,
            snapshot_len,
            snapshot_after: opts.snapshot_after_bytes,
            rev_tx,
            failed: None,
            _lock: lock,
        };
        if !orphaned.is_empty() {
            let n = orphaned.len();
            match writer.delete_keys(orphaned) {
                Ok(r) => info!(
                    keys = n,
                    revision = r,
                    "deleted the keys of leases that ended with the previous process"
                ),
                Err(e) => return Err(e),
            }
        }
        let handle = std::thread::Builder::new()
            .name("isthmus-store-wal".into())
            .spawn(move || writer.run(req_rx))?;
        Ok(Arc::new_cyclic(|me| EmbeddedStore {
            shared,
            me: me.clone(),
            requests: Some(req_tx),
            writer: Some(handle),
            rev_rx,
            watch_buffer: opts.watch_buffer.max(1),
        }))
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer; joining it releases the lock before we return,
        // so the directory can be reopened right away.
        self.requests.take();
        if let Some(h) = self.writer.take() {
            if h.join().is_err() {
                error!("store writer thread panicked");
            }
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    dir: PathBuf,
    wal: File,
    /// End of the last record.
    wal_len: u64,
    /// File size: zeros from `wal_len` on, written ahead so that an fdatasync after a write
    /// need not also commit a new file size (several times faster on ext4).
    wal_alloc: u64,
    snapshot_len: u64,
    snapshot_after: u64,
    rev_tx: watch::Sender<Revision>,
    /// Set after an I/O error: the log's end is unknown, so no further write is safe.
    failed: Option<String>,
    _lock: File,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut bytes = first.bytes();
            let mut queued = vec![first];
            while queued.len() < MAX_GROUP_TXNS && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.bytes();
                        queued.push(r);
                    }
                    Err(_) => break,
                }
            }
            let mut group = Vec::with_capacity(queued.len());
            for req in queued {
                match req {
                    Request::Txn(t) => group.push(t),
                    Request::Compact { revision, reply } => {
                        // Keep arrival order: txns queued before the compaction go first.
                        if !group.is_empty() {
                            self.commit(std::mem::take(&mut group));
                        }
                        let _ = reply.send(self.compact(revision));
                    }
                    Request::EndLease { lease, force, reply } => {
                        if !group.is_empty() {
                            self.commit(std::mem::take(&mut group));
                        }
                        let r = self.end_lease(lease, force);
                        if let Some(reply) = reply {
                            let _ = reply.send(r);
                        }
                    }
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if self.failed.is_none() && self.wal_len > self.snapshot_after.max(self.snapshot_len) {
                self.rotate();
            }
        }
        self.close();
        debug!("store writer stopped");
    }

    fn compact(&self, revision: Revision) -> Result<()> {
        let mut state = write_lock(&self.shared.state);
        if revision > state.revision {
            return Err(StoreError::Invalid(format!(
                "cannot compact to future revision {revision} (current {})",
                state.revision
            )));
        }
        while state.history.front().is_some_and(|e| e.revision < revision) {
            state.pop_history();
        }
        Ok(())
    }

    /// Removes `lease` from the table (an expired one only if it is still expired: never one
    /// that was renewed meanwhile) and deletes its keys in one transaction.
    fn end_lease(&mut self, lease: LeaseId, force: bool) -> Result<()> {
        {
            let mut table = lease_table(&self.shared);
            match table.get(&lease) {
                Some(l) if !force && l.deadline > Instant::now() => return Ok(()),
                _ => {}
            }
            table.remove(&lease);
        }
        let mut keys: Vec<String> = read_lock(&self.shared.state)
            .leased
            .iter()
            .filter(|(_, l)| **l == lease)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort();
        let n = keys.len();
        let rev = self.delete_keys(keys)?;
        debug!(lease, keys = n, revision = rev, force, "lease ended; its keys deleted");
        Ok(())
    }

    /// Deletes `keys` in one transaction through the log; returns its revision.
    fn delete_keys(&mut self, keys: Vec<String>) -> Result<Revision> {
        let ops: Vec<Op> = keys.into_iter().map(Op::delete).collect();
        let bytes = ops.iter().map(|o| o.key().len()).sum();
        let (reply, mut rx) = oneshot::channel();
        self.commit(vec![TxnRequest {
            compares: vec![],
            ops,
            bytes,
            reply,
        }]);
        match rx.try_recv() {
            Ok(r) => r.map(|t| t.revision),
            Err(_) => Err(StoreError::Unavailable("store writer gave no answer".into())),
        }
    }

    fn commit(&mut self, group: Vec<TxnRequest>) {
        if let Some(why) = &self.failed {
            for r in group {
                let _ = r.reply.send(Err(StoreError::Unavailable(format!(
                    "store stopped accepting writes after an I/O error: {why}"
                ))));
            }
            return;
        }
        let mut replies = Vec::with_capacity(group.len());
        let mut committed = Vec::new();
        let mut buf = Vec::new();
        {
            let state = read_lock(&self.shared.state);
            let group_start = state.revision + 1;
            let mut rev = state.revision;
            let mut overlay: HashMap<String, Option<KeyValue>> = HashMap::new();
            for req in group {
                let holds = req
                    .compares
                    .iter()
                    .all(|c| compare_holds(c, lookup(&overlay, &state.data, compare_key(c))));
                if !holds {
                    let mut res = TxnResult {
                        succeeded: false,
                        revision: rev,
                        ..Default::default()
                    };
                    for c in &req.compares {
                        let k = compare_key(c);
                        match lookup(&overlay, &state.data, k) {
                            Some(kv) => res.compared_revision = res.compared_revision.max(kv.mod_revision),
                            None if !res.compared_absent.iter().any(|a| a == k) => {
                                res.compared_absent.push(k.to_string())
                            }
                            None => {}
                        }
                    }
                    replies.push((req.reply, Ok(res)));
                    continue;
                }
                let dead_lease = {
                    let table = lease_table(&self.shared);
                    req.ops.iter().find_map(|op| match op {
                        Op::PutWithLease { lease, .. } if !table.contains_key(lease) => Some(*lease),
                        _ => None,
                    })
                };
                if let Some(lease) = dead_lease {
                    replies.push((
                        req.reply,
                        Err(StoreError::Invalid(format!("requested lease not found: {lease}"))),
                    ));
                    continue;
                }
                let (events, leases) = txn_events(rev + 1, req.ops, &overlay, &state.data);
                if events.is_empty() {
                    replies.push((req.reply, Ok(TxnResult::applied(rev))));
                    continue;
                }
                rev += 1;
                encode_record(&mut buf, rev, group_start, &events, &leases);
                for e in &events {
                    let v = matches!(e.kind, EventKind::Put).then(|| e.kv.clone());
                    overlay.insert(e.kv.key.clone(), v);
                }
                committed.push((rev, events, leases));
                replies.push((req.reply, Ok(TxnResult::applied(rev))));
            }
        }
        if !buf.is_empty() {
            let end = self.wal_len + buf.len() as u64;
            if let Err(e) = self.preallocate(end) {
                // Only zeros past the log's end were (maybe) written: the log is intact and a
                // later group may succeed (e.g. once disk space is freed).
                error!(error = %e, "store log preallocation failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(StoreError::Io(io::Error::new(e.kind(), e.to_string()))));
                }
                return;
            }
            if let Err(e) = self.append(&buf) {
                // Results computed against unwritten txns are void too: fail the whole group.
                error!(error = %e, "store log write failed; refusing further writes");
                self.failed = Some(e.to_string());
                for (reply, _) in replies {
                    let _ = reply.send(Err(StoreError::Io(io::Error::new(e.kind(), e.to_string()))));
                }
                return;
            }
        }
        if !committed.is_empty() {
            let mut state = write_lock(&self.shared.state);
            for (rev, events, leases) in committed {
                state.apply(rev, events, leases);
            }
            let rev = state.revision;
            drop(state);
            self.rev_tx.send_replace(rev);
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let end = self.wal_len + buf.len() as u64;
        self.wal.write_all_at(buf, self.wal_len)?;
        self.wal.sync_data()?;
        self.wal_len = end;
        Ok(())
    }

    /// Zero-fills the log up to at least `need` bytes, in chunks growing with the log so small
    /// stores stay small. Zeros, not fallocate: unwritten extents would still cost a metadata
    /// commit on every later fdatasync.
    fn preallocate(&mut self, need: u64) -> io::Result<()> {
        if need <= self.wal_alloc {
            return Ok(());
        }
        let chunk = self.wal_alloc.clamp(PREALLOC_MIN, PREALLOC_MAX);
        let target = need.max(self.wal_alloc + chunk);
        let zeros = vec![0u8; 1 << 20];
        let mut pos = self.wal_alloc;
        while pos < target {
            let n = (target - pos).min(zeros.len() as u64) as usize;
            self.wal.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        self.wal.sync_all()?;
        self.wal_alloc = target;
        Ok(())
    }

    /// Clean shutdown: leave no preallocated zeros behind.
    fn close(&mut self) {
        if self.failed.is_some() || self.wal_alloc == self.wal_len {
            return;
        }
        if let Err(e) = self.wal.set_len(self.wal_len).and_then(|()| self.wal.sync_all()) {
            warn!(error = %e, "could not trim the store log on close");
        }
    }

    /// Snapshot the dataset and start an empty log.
    fn rotate(&mut self) {
        let result = {
            let state = read_lock(&self.shared.state);
            write_snapshot(&self.dir, &state).map(|len| (len, state.revision))
        };
        let (len, rev) = match result {
            Ok(r) => r,
            Err(e) => {
                // The old log is intact and still authoritative; try again after it has grown.
                warn!(error = %e, "store snapshot failed; keeping the current log");
                let _ = fs::remove_file(self.dir.join(format!("{SNAPSHOT_FILE}{TMP_SUFFIX}")));
                self.snapshot_len = self.wal_len.saturating_mul(2);
                return;
            }
        };
        match self.new_log() {
            Ok(wal) => {
                info!(revision = rev, snapshot_bytes = len, "store log rotated");
                self.wal = wal;
                self.wal_len = 0;
                self.wal_alloc = 0;
                self.snapshot_len = len;
            }
            Err(e) => {
                // Unclear whether `wal` now names the new file; appending to the old one could
                // be lost. Stop writing.
                error!(error = %e, "store log rotation failed; refusing further writes");
                self.failed = Some(e.to_string());
            }
        }
    }

    fn new_log(&self) -> io::Result<File> {
        let tmp = self.dir.join(format!("{WAL_FILE}{TMP_SUFFIX}"));
        // A leftover from a failed rotation must not leak records into the new log.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = private_file().create_new(true).write(true).open(&tmp)?;
        file.sync_all()?;
        fs::rename(&tmp, self.dir.join(WAL_FILE))?;
        sync_dir(&self.dir)?;
        Ok(file)
    }
}

enum Step {
    Compacted(Revision),
    Events { events: Vec<Event>, caught_up: bool },
}

/// Collects the next events under `prefix` starting at `*next`, whole revisions only.
fn collect(state: &State, prefix: &str, next: &mut Revision) -> Step {
    let compact = state.compact_revision();
    if *next < compact {
        return Step::Compacted(compact);
    }
    let mut events = Vec::new();
    while *next <= state.revision && events.len() < MAX_WATCH_BATCH_EVENTS {
        let Some(entry) = usize::try_from(*next - compact).ok().and_then(|i| state.history.get(i)) else {
            // Cannot happen while the history covers compact..=revision; end the watch cleanly
            // rather than skip events.
            return Step::Compacted(compact);
        };
        debug_assert_eq!(entry.revision, *next);
        events.extend(entry.events.iter().filter(|e| e.kv.key.starts_with(prefix)).cloned());
        *next += 1;
    }
    Step::Events {
        events,
        caught_up: *next > state.revision,
    }
}

/// One task per watcher: follows the shared history with its own cursor. Writers never wait
/// for it; if it falls behind the retained history it ends with `Compacted`.
async fn run_watcher(
    shared: Arc<Shared>,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<Result<WatchEvent>>,
    mut rev_rx: watch::Receiver<Revision>,
) {
    let mut writer_gone = false;
    loop {
        // Mark the current revision seen before reading, so a later write wakes us.
        rev_rx.borrow_and_update();
        let step = collect(&read_lock(&shared.state), &prefix, &mut next);
        match step {
            Step::Compacted(compact_revision) => {
                let _ = tx.send(Ok(WatchEvent::Compacted { compact_revision })).await;
                return;
            }
            Step::Events { events, caught_up } => {
                if !events.is_empty() && tx.send(Ok(WatchEvent::Events(events))).await.is_err() {
                    return;
                }
                if !caught_up {
                    continue;
                }
            }
        }
        if writer_gone {
            return;
        }
        tokio::select! {
            changed = rev_rx.changed() => {
                // The store is gone: deliver what is left, then end.
                writer_gone = changed.is_err();
            }
            _ = tx.closed() => return,
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(read_lock(&self.shared.state).data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let state = read_lock(&self.shared.state);
        let kvs = state
            .data
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((kvs, state.revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let bytes = validate_txn(&compares, &ops, MAX_TXN_BYTES)?;
        let stopped = || StoreError::Unavailable("store writer has stopped".into());
        let (reply, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(Request::Txn(TxnRequest {
                compares,
                ops,
                bytes,
                reply,
            }))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch> {
        if from_revision < 0 {
            return Err(StoreError::Invalid(format!("negative watch revision {from_revision}")));
        }
        let next = if from_revision == 0 {
            read_lock(&self.shared.state).revision + 1
        } else {
            from_revision
        };
        let (tx, rx) = mpsc::channel(self.watch_buffer);
        tokio::spawn(run_watcher(
            self.shared.clone(),
            prefix.to_string(),
            next,
            tx,
            self.rev_rx.clone(),
        ));
        Ok(Watch { rx })
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(read_lock(&self.shared.state).revision)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let stopped = || StoreError::Unavailable("store writer has stopped".into());
        let (reply, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(Request::Compact { revision, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<LeaseId> {
        static NEXT: AtomicI64 = AtomicI64::new(0);
        if ttl_secs < 1 {
            return Err(StoreError::Invalid(format!("lease TTL {ttl_secs} s is below 1 s")));
        }
        let ttl = Duration::from_secs(ttl_secs.unsigned_abs());
        // Ids need only be unique while this process lives (leases do not outlive it); start
        // from the clock so ids are not reused across restarts either.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as i64);
        let _ = NEXT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
        let id = NEXT.fetch_add(1, Ordering::Relaxed).max(1);
        lease_table(&self.shared).insert(
            id,
            LeaseState {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        self.start_reaper();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut table = lease_table(&self.shared);
        let now = Instant::now();
        match table.get_mut(&lease) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let stopped = || StoreError::Unavailable("store writer has stopped".into());
        let (reply, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(Request::EndLease {
                lease,
                force: true,
                reply: Some(reply),
            })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl EmbeddedStore {
    /// Starts (once) the task that ends expired leases. It holds the store only while it
    /// works, so dropping the store stops it.
    fn start_reaper(&self) {
        if self.shared.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_CHECK).await;
                let Some(store) = me.upgrade() else { return };
                let now = Instant::now();
                let expired: Vec<LeaseId> = lease_table(&store.shared)
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for lease in expired {
                    let Some(tx) = store.requests.as_ref() else { return };
                    if tx
                        .send(Request::EndLease {
                            lease,
                            force: false,
                            reply: None,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, key: &str, value: &[u8], rev: Revision) -> Event {
        Event {
            kind,
            kv: KeyValue {
                key: key.into(),
                value: value.to_vec(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
            },
        }
    }

    #[test]
    fn record_round_trip() {
        let mut buf = Vec::new();
        let events = vec![ev(EventKind::Put, "a", b"1", 7), ev(EventKind::Delete, "b", b"", 7)];
        encode_record(&mut buf, 7, 6, &events, &[0, 0]);
        let (rec, next) = parse_record(&buf, 0).expect("valid record");
        assert_eq!(next, buf.len());
        assert_eq!((rec.revision, rec.group_start), (7, 6));
        assert_eq!(rec.ops, vec![Op::put("a", b"1".to_vec()), Op::delete("b")]);
    }

    #[test]
    fn damaged_records_are_rejected_without_panic() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, 1, &[ev(EventKind::Put, "k", b"v", 1)], &[0]);
        for cut in 0..buf.len() {
            assert!(parse_record(&buf[..cut], 0).is_err(), "prefix of {cut} bytes accepted");
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(parse_record(&bad, 0).is_err(), "flip at byte {i} accepted");
        }
        assert!(decode_payload(&[]).is_none());
        assert!(decode_payload(&[RECORD_FORMAT; 64]).is_none());
    }

    #[test]
    fn snapshot_rejects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = State::new(&EmbeddedOptions::default());
        state.apply(1, vec![ev(EventKind::Put, "k", b"v", 1)], vec![0]);
        write_snapshot(dir.path(), &state).expect("snapshot");
        let bytes = fs::read(dir.path().join(SNAPSHOT_FILE)).expect("read");
        let mut loaded = State::new(&EmbeddedOptions::default());
        load_snapshot(&bytes, &mut loaded).expect("load");
        assert_eq!(loaded.revision, 1);
        assert_eq!(loaded.data, state.data);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            let mut s = State::new(&EmbeddedOptions::default());
            assert!(matches!(load_snapshot(&bad, &mut s), Err(StoreError::Corrupt(_))));
        }
    }
}
