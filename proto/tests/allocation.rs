//! Allocation tests: a length prefix over the limit is refused without
//! allocating anything, and decoding hostile bytes allocates in proportion
//! to the bytes actually received, never to the lengths they claim.
//!
//! A counting global allocator measures it, per thread so that tests
//! running in parallel do not see each other's allocations.

// The counting allocator needs `unsafe impl GlobalAlloc`; every method only
// forwards to `System` with the caller's arguments, under the caller's
// guarantees, and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use outbox_proto::{decode_one, frame_len, DecodeError, FrameDecoder, Limits, HEADER_LEN};
use proptest::prelude::*;

struct Counting;

#[global_allocator]
static GLOBAL: Counting = Counting;

thread_local! {
    // `const` and destructor-free: reading them never allocates, so the
    // allocator may use them.
    static TOTAL: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count(size: usize) {
    // `try_with`: the thread's locals may already be gone at its exit.
    let _ = TOTAL.try_with(|t| t.set(t.get() + size));
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

/// What `f` allocated on this thread.
#[derive(Debug, Clone, Copy)]
struct Allocated {
    total: usize,
    largest: usize,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    TOTAL.with(|t| t.set(0));
    LARGEST.with(|l| l.set(0));
    let out = f();
    let allocated = Allocated {
        total: TOTAL.with(Cell::get),
        largest: LARGEST.with(Cell::get),
    };
    (out, allocated)
}

/// A frame header followed by `payload`.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn the_counter_counts() {
    let (v, a) = measure(|| vec![0u8; 1000]);
    assert!(a.total >= 1000 && a.largest >= 1000, "{a:?}");
    drop(v);
}

/// Payloads whose lengths claim far more than they hold: each is refused
/// having allocated next to nothing.
#[test]
fn claimed_lengths_are_never_allocated() {
    let limits = Limits::default();
    // A varint length of 2^32 - 1: marker 0xfc and a little-endian u32.
    let huge = [0xfc, 0xff, 0xff, 0xff, 0xff];
    // Body chunk: claims 4 GiB of bytes.
    let chunk = [&[6][..], &huge].concat();
    // Hello: a name claiming 4 GiB.
    let hello = [&[0][..], &huge].concat();
    // Request head: an empty method, a url claiming 4 GiB.
    let url = [&[4, 0][..], &huge].concat();
    // Response head: status 200, 2^32 - 1 headers, then one real one.
    let headers = [&[5, 200][..], &huge, &[1, b'a', 0]].concat();
    // Body chunk: claims 1 MiB - 6 (within every limit), holds 3 bytes.
    let near = [&[6, 0xfc, 0xfa, 0xff, 0x0f, 0x00][..], &[1, 2, 3]].concat();
    for payload in [chunk, hello, url, headers, near] {
        let bytes = framed(&payload);
        let (result, a) = measure(|| decode_one(&bytes, &limits));
        assert!(result.is_err(), "{payload:?}");
        assert!(a.largest <= 2048, "{payload:?}: {a:?}");
        assert!(a.total <= 4096, "{payload:?}: {a:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (4) A length prefix over the limit is refused without allocating:
    /// nothing at all from `frame_len` and `decode_one`, and no more than
    /// the bytes pushed from the stream decoder.
    #[test]
    fn oversized_length_prefixes_are_refused_without_allocation(
        len in (1u32 << 20) + 1..=u32::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let limits = Limits::default();
        let header = len.to_be_bytes();
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&tail);
        let mut decoder = FrameDecoder::new(limits);

        let (r, a) = measure(|| frame_len(header, &limits));
        prop_assert!(matches!(r, Err(DecodeError::LengthTooLarge { .. })), "{:?}", r);
        prop_assert_eq!(a.total, 0);

        let (r, a) = measure(|| decode_one(&bytes, &limits));
        prop_assert!(matches!(r, Err(DecodeError::LengthTooLarge { .. })), "{:?}", r);
        prop_assert_eq!(a.total, 0);

        let (r, a) = measure(|| {
            decoder.push(&bytes);
            decoder.next_frame()
        });
        prop_assert!(matches!(r, Err(DecodeError::LengthTooLarge { .. })), "{:?}", r);
        prop_assert!(a.largest <= bytes.len().max(8), "{:?}", a);
    }

    /// Decoding any payload allocates in proportion to its length: the
    /// header list it borrows grows with entries actually read (32 bytes
    /// each, at least 2 payload bytes each, doubled by growth), plus an
    /// error message or the frame's own copy.
    #[test]
    fn decoding_allocates_in_proportion_to_the_input(
        tag in 0u8..9,
        rest in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let limits = Limits::default();
        let payload = [&[tag][..], &rest].concat();
        let bytes = framed(&payload);
        let n = payload.len();
        let (_, a) = measure(|| decode_one(&bytes, &limits));
        prop_assert!(a.largest <= 32 * n + 2048, "{} bytes: {:?}", n, a);
        prop_assert!(a.total <= 64 * n + 8192, "{} bytes: {:?}", n, a);
    }
}

/// The header is all a reader needs to refuse a frame: nothing of the
/// claimed payload is read, let alone allocated.
#[test]
fn a_reader_refuses_from_the_header_alone() {
    let limits = Limits::default();
    let header = [0xff; HEADER_LEN];
    let (r, a) = measure(|| frame_len(header, &limits));
    assert_eq!(
        r.unwrap_err().to_string(),
        "frame length prefix announces 4294967295 bytes, expected at most 1048576"
    );
    assert_eq!(a.total, 0);
}
