//! Random bytes for tokens and certificate serial numbers, from the kernel, without a `rand` dependency.

use std::io::Read;

/// `N` random bytes from `/dev/urandom`.
pub(crate) fn bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .unwrap_or_else(|e| panic!("cannot read /dev/urandom: {e}"));
    buf
}

/// `N` random bytes as lowercase hex.
pub(crate) fn hex<const N: usize>() -> String {
    bytes::<N>().iter().map(|b| format!("{b:02x}")).collect()
}
