//! The kernel's batched map operations (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`),
//! which aya 0.14 does not wrap: one system call for thousands of entries, where
//! element-by-element writes of a 65,537-slot Maglev table take 65,537.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_int = 24;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_int = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    pub(crate) in_batch: u64,
    pub(crate) out_batch: u64,
    pub(crate) keys: u64,
    pub(crate) values: u64,
    pub(crate) count: u32,
    pub(crate) map_fd: u32,
    pub(crate) elem_flags: u64,
    pub(crate) flags: u64,
}

/// The `bpf` system call with `attr`, a `union bpf_attr` member of `cmd`.
pub(crate) fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for `cmd`, and every pointer in it
    // refers to memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `keys[i]` → `values[i]` for every `i`, in chunks of at most `chunk`.
pub fn update<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    chunk: usize,
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    for (keys, values) in keys.chunks(chunk).zip(values.chunks(chunk)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != keys.len() {
            return Err(io::Error::other(format!(
                "the kernel wrote {} of {} entries",
                attr.count,
                keys.len()
            )));
        }
    }
    Ok(())
}

/// Reads every entry of a hash map, `chunk` at a time, calling `each` for each.
pub fn for_each<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The kernel's cursor is opaque: as big as a key of the map's type.
    let mut cursor = [0u8; 64];
    let mut started = false;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started { cursor.as_ptr() as u64 } else { 0 },
            out_batch: cursor.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        for i in 0..attr.count as usize {
            each(&keys[i], &values[i]);
        }
        match result {
            Ok(()) => started = true,
            // The last chunk ends with ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
