//! Any map's entries as bytes, through the kernel's map commands: what a migration
//! needs to carry maps it does not know the types of (a per-CPU array, a trie, a
//! devmap) from one layout to another.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::maps::{MapData, MapType};

use crate::batch::{BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr, bpf};

const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
/// `BPF_NOEXIST`: only where the key is not there yet.
pub const NO_EXIST: u64 = 1;
/// The kernel's ENOTSUPP (not in libc): a map type without batched lookups.
const ENOTSUPP: i32 = 524;

/// The element commands' part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// Entries read from a map: keys and values laid end to end.
#[derive(Clone, Debug, Default)]
pub struct Entries {
    key_len: usize,
    value_len: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl Entries {
    fn new(key_len: usize, value_len: usize) -> Self {
        Self {
            key_len,
            value_len,
            ..Default::default()
        }
    }

    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.keys.extend_from_slice(key);
        self.values.extend_from_slice(value);
    }

    /// None yet, for entries of `old` carried into `new`.
    pub fn like(old: &RawMap, new: &RawMap) -> Self {
        Self::new(old.key_len, new.value_len)
    }

    /// Adds `value`, read from `old`, as a value of `new`: each CPU's slot cut to
    /// the old size and padded with zeros to the new one.
    pub fn push_widened(&mut self, key: &[u8], value: &[u8], old: &RawMap, new: &RawMap) {
        self.keys.extend_from_slice(key);
        let start = self.values.len();
        self.values.resize(start + new.value_len, 0);
        let (old_slot, new_slot) = (old.value_len / old.cpus, new.value_len / new.cpus);
        let width = old.value_size.min(new.value_size);
        for cpu in 0..old.cpus.min(new.cpus) {
            let from = &value[cpu * old_slot..cpu * old_slot + width];
            let to = start + cpu * new_slot;
            self.values[to..to + width].copy_from_slice(from);
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.keys.len().checked_div(self.key_len).unwrap_or(0)
    }

    /// Each (key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks_exact(self.key_len.max(1))
            .zip(self.values.chunks_exact(self.value_len.max(1)))
    }
}

/// A map opened from its pin, handled as bytes.
pub struct RawMap {
    data: MapData,
    key_len: usize,
    /// What one element's value is in the system calls: for per-CPU maps, one slot
    /// of `value_size` rounded up to 8 bytes per possible CPU.
    value_len: usize,
    value_size: usize,
    cpus: usize,
    array: bool,
    max_entries: u32,
}

impl RawMap {
    /// Opens the map pinned at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let data = MapData::from_pin(path).map_err(io::Error::other)?;
        let info = data.info().map_err(io::Error::other)?;
        let kind = info.map_type().map_err(io::Error::other)?;
        let per_cpu = matches!(
            kind,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        );
        let cpus = if per_cpu {
            aya::util::nr_cpus().map_err(|(_, e)| e)?
        } else {
            1
        };
        let value_size = info.value_size() as usize;
        let slot = if per_cpu {
            value_size.next_multiple_of(8)
        } else {
            value_size
        };
        Ok(Self {
            data,
            key_len: info.key_size() as usize,
            value_len: slot * cpus,
            value_size,
            cpus,
            array: matches!(kind, MapType::Array | MapType::PerCpuArray),
            max_entries: info.max_entries(),
        })
    }

    /// One value's size as the map declares it (one CPU's, for a per-CPU map).
    pub fn value_size(&self) -> usize {
        self.value_size
    }

    /// Possible CPUs of a per-CPU map, 1 otherwise.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    fn fd(&self) -> u32 {
        self.data.fd().as_fd().as_raw_fd() as u32
    }

    /// Every entry (of an array: those that are not all zeros, as a new array is).
    pub fn entries(&self) -> io::Result<Entries> {
        let mut out = Entries::new(self.key_len, self.value_len);
        match self.entries_batched(&mut out) {
            Ok(()) => {}
            // Tries and devmaps have no batched lookups: walk them key by key.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                out = Entries::new(self.key_len, self.value_len);
                self.entries_by_key(&mut out)?;
            }
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    fn keep(&self, value: &[u8]) -> bool {
        !self.array || value.iter().any(|b| *b != 0)
    }

    fn entries_batched(&self, out: &mut Entries) -> io::Result<()> {
        const CHUNK: usize = 4096;
        let mut keys = vec![0u8; CHUNK * self.key_len];
        let mut values = vec![0u8; CHUNK * self.value_len];
        // The kernel's cursor is opaque: as big as a key of the map's type.
        let mut cursor = vec![0u8; self.key_len.max(8)];
        let mut started = false;
        loop {
            let mut attr = BatchAttr {
                in_batch: if started { cursor.as_ptr() as u64 } else { 0 },
                out_batch: cursor.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: CHUNK as u32,
                map_fd: self.fd(),
                ..Default::default()
            };
            let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            if result.is_ok() || result.as_ref().is_err_and(is_end) {
                for i in 0..attr.count as usize {
                    let value = &values[i * self.value_len..(i + 1) * self.value_len];
                    if self.keep(value) {
                        out.push(&keys[i * self.key_len..(i + 1) * self.key_len], value);
                    }
                }
            }
            match result {
                Ok(()) => started = true,
                // The last chunk ends with ENOENT.
                Err(e) if is_end(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn entries_by_key(&self, out: &mut Entries) -> io::Result<()> {
        let mut key = vec![0u8; self.key_len];
        let mut next = vec![0u8; self.key_len];
        let mut value = vec![0u8; self.value_len];
        let mut first = true;
        // A key deleted while we walk restarts the walk: bounded all the same.
        for _ in 0..=(self.max_entries as u64) * 2 {
            let mut attr = ElemAttr {
                map_fd: self.fd(),
                key: if first { 0 } else { key.as_ptr() as u64 },
                value_or_next_key: next.as_mut_ptr() as u64,
                ..Default::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {}
                Err(e) if is_end(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
            first = false;
            key.copy_from_slice(&next);
            if self.lookup(&key, &mut value)? && self.keep(&value) {
                out.push(&key, &value);
            }
        }
        Ok(())
    }

    fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if is_end(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value of `key`, if it is there.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_len];
        Ok(self.lookup(key, &mut value)?.then_some(value))
    }

    /// Writes every entry of `entries` (read from a map of the same key and value
    /// sizes), thousands per system call where the map type allows.
    pub fn put_all(&self, entries: &Entries) -> io::Result<()> {
        const CHUNK: usize = 4096;
        assert_eq!(entries.key_len, self.key_len, "key size");
        assert_eq!(entries.value_len, self.value_len, "value size");
        let keys = entries.keys.chunks(CHUNK * self.key_len.max(1));
        let values = entries.values.chunks(CHUNK * self.value_len.max(1));
        for (keys, values) in keys.zip(values) {
            let count = keys.len() / self.key_len.max(1);
            let mut attr = BatchAttr {
                keys: keys.as_ptr() as u64,
                values: values.as_ptr() as u64,
                count: count as u32,
                map_fd: self.fd(),
                ..Default::default()
            };
            match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
                Ok(()) if attr.count as usize == count => {}
                Ok(()) => {
                    return Err(io::Error::other(format!(
                        "the kernel wrote {} of {count} entries",
                        attr.count
                    )));
                }
                // Tries and devmaps: one entry at a time.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                    let key_len = self.key_len;
                    let value_len = self.value_len;
                    for (key, value) in keys
                        .chunks_exact(key_len)
                        .zip(values.chunks_exact(value_len))
                    {
                        self.put(key, value, 0)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes one entry (`flags`: 0, or [`NO_EXIST`]). Whether it was written: with
    /// `NO_EXIST`, a key already there is left as it is.
    pub fn put(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<bool> {
        assert_eq!(key.len(), self.key_len, "key size");
        assert_eq!(value.len(), self.value_len, "value size");
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_ptr() as u64,
            flags,
            ..Default::default()
        };
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn is_end(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}
