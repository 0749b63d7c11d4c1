//! The request headers in one host call, read in place.
//!
//! The SDK's `get_http_request_headers` copies every name and value into two `String`s (about 20
//! allocations per request, most of the filter's own work on an authenticated request) and
//! panics on a value that is not UTF-8. HTTP allows such values (obs-text), so one client header
//! would trap the VM. Here the host's buffer is kept as it is and the caller takes only what it
//! needs, deciding itself what to do with bytes that are not UTF-8.

use std::ops::Range;

/// The serialised header map the host returned: a little-endian `u32` count, then a `u32` name
/// length and `u32` value length per header, then each name and value followed by a NUL.
pub struct HeaderMapBytes {
    buf: Vec<u8>,
}

#[allow(unsafe_code)]
mod ffi {
    // The SDK's own import names the module too; without it the symbol is left to the linker.
    #[link(wasm_import_module = "env")]
    extern "C" {
        /// proxy-wasm ABI 0.2.1; the SDK imports it too (same module, name and signature).
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
    }
}

/// `MapType::HttpRequestHeaders`.
const REQUEST_HEADERS: u32 = 0;
/// `MapType::HttpRequestTrailers`.
const REQUEST_TRAILERS: u32 = 1;
/// `MapType::HttpCallResponseHeaders`.
const CALL_RESPONSE_HEADERS: u32 = 6;
/// `Status::Ok`.
const STATUS_OK: u32 = 0;

impl HeaderMapBytes {
    /// The current request's headers; `None` when the host refuses (the caller fails closed).
    pub fn request() -> Option<Self> {
        Self::get(REQUEST_HEADERS)
    }

    /// The current request's trailers; `None` when the host refuses.
    pub fn request_trailers() -> Option<Self> {
        Self::get(REQUEST_TRAILERS)
    }

    /// The headers of the IdP's answer to a callout (in `on_http_call_response`); `None` when the
    /// host refuses.
    pub fn call_response() -> Option<Self> {
        Self::get(CALL_RESPONSE_HEADERS)
    }

    #[allow(unsafe_code)]
    fn get(map_type: u32) -> Option<Self> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer and a length into the two locals. The buffer was
        // allocated through this module's `proxy_on_memory_allocate` (the SDK's, a boxed slice
        // of exactly `size` bytes) and is handed over: taking it back as a `Vec` of that length
        // and capacity is how the SDK itself frees it.
        let status = unsafe { ffi::proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
        if status != STATUS_OK {
            return None;
        }
        if data.is_null() {
            return Some(Self::from_bytes(Vec::new()));
        }
        // SAFETY: see above.
        let buf = unsafe { Vec::from_raw_parts(data, size, size) };
        Some(Self::from_bytes(buf))
    }

    /// A map from serialised bytes (tests; the host's buffer in [`HeaderMapBytes::request`]).
    pub fn from_bytes(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    /// Every `(name, value)`, in order. A malformed buffer ends the iteration where it breaks.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.ranges()
            .filter_map(|(name, value)| Some((self.buf.get(name)?, self.buf.get(value)?)))
    }

    /// Every `(name, value range)`, in order, the range indexing [`HeaderMapBytes::values`] (and
    /// the text [`HeaderMapBytes::into_text`] returns). A malformed buffer ends the iteration
    /// where it breaks.
    pub fn spans(&self) -> impl Iterator<Item = (&[u8], Range<usize>)> + '_ {
        let start = self.values_start();
        self.ranges().filter_map(move |(name, value)| {
            Some((
                self.buf.get(name)?,
                value.start.checked_sub(start)?..value.end.checked_sub(start)?,
            ))
        })
    }

    /// The bytes the ranges of [`HeaderMapBytes::spans`] index: the names and values after the
    /// table of lengths.
    pub fn values(&self) -> &[u8] {
        self.buf.get(self.values_start()..).unwrap_or_default()
    }

    /// [`HeaderMapBytes::values`] as a string without a copy when they are all UTF-8 (one
    /// validation pass for the whole request); the bytes back otherwise.
    pub fn into_text(mut self) -> Result<String, Vec<u8>> {
        let start = self.values_start().min(self.buf.len());
        self.buf.drain(..start);
        String::from_utf8(self.buf).map_err(|e| e.into_bytes())
    }

    fn values_start(&self) -> usize {
        read_u32(&self.buf, 0)
            .and_then(|count| count.checked_mul(8))
            .and_then(|n| n.checked_add(4))
            .unwrap_or(usize::MAX)
    }

    fn ranges(&self) -> Ranges<'_> {
        Ranges {
            buf: &self.buf,
            index: 0,
            count: read_u32(&self.buf, 0).unwrap_or(0),
            data: self.values_start(),
        }
    }
}

/// Where each name and value lies in the buffer, checked against its length.
struct Ranges<'a> {
    buf: &'a [u8],
    index: usize,
    count: usize,
    data: usize,
}

impl Iterator for Ranges<'_> {
    type Item = (Range<usize>, Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let sizes = self.index.checked_mul(8)?.checked_add(4)?;
        let name_len = read_u32(self.buf, sizes)?;
        let value_len = read_u32(self.buf, sizes.checked_add(4)?)?;
        let name_end = self.data.checked_add(name_len)?;
        let value_start = name_end.checked_add(1)?;
        let value_end = value_start.checked_add(value_len)?;
        if value_end > self.buf.len() {
            return None;
        }
        let name = self.data..name_end;
        self.data = value_end.checked_add(1)?;
        self.index += 1;
        Some((name, value_start..value_end))
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<usize> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    let v = u32::from_le_bytes(bytes.try_into().ok()?);
    usize::try_from(v).ok()
}

/// What a host serialises for `pairs` (tests of the readers).
#[cfg(test)]
pub(crate) fn serialise(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_host_serialised_including_values_that_are_not_utf8() {
        let pairs: &[(&[u8], &[u8])] = &[
            (b":authority", b"app.example.com"),
            (b"cookie", b"a=1"),
            (b"x-note", b"caf\xe9"),
            (b"empty", b""),
        ];
        let map = HeaderMapBytes::from_bytes(serialise(pairs));
        let got: Vec<_> = map.pairs().collect();
        assert_eq!(got, pairs);
        assert_eq!(HeaderMapBytes::from_bytes(Vec::new()).pairs().count(), 0);
    }

    #[test]
    fn spans_index_the_text_and_bytes_that_are_not_utf8_come_back() {
        let pairs: &[(&[u8], &[u8])] = &[
            (b":authority", b"app.example.com"),
            (b"cookie", b"a=1; b=2"),
            (b"empty", b""),
        ];
        let map = HeaderMapBytes::from_bytes(serialise(pairs));
        let spans: Vec<_> = map.spans().map(|(n, r)| (n.to_vec(), r)).collect();
        assert_eq!(spans.len(), pairs.len());
        for ((name, range), (want_name, want_value)) in spans.iter().zip(pairs) {
            assert_eq!(name, want_name);
            assert_eq!(&map.values()[range.clone()], *want_value);
        }
        let text = map.into_text().unwrap();
        for ((_, range), (_, want_value)) in spans.iter().zip(pairs) {
            assert_eq!(text[range.clone()].as_bytes(), *want_value);
        }

        let bad: &[(&[u8], &[u8])] = &[(b"x-note", b"caf\xe9"), (b"cookie", b"a=1")];
        let map = HeaderMapBytes::from_bytes(serialise(bad));
        let spans: Vec<_> = map.spans().map(|(_, r)| r).collect();
        let raw = map.into_text().unwrap_err();
        assert_eq!(&raw[spans[0].clone()], b"caf\xe9");
        assert_eq!(&raw[spans[1].clone()], b"a=1");
    }

    #[test]
    fn a_malformed_buffer_ends_the_iteration_without_panicking() {
        let good = serialise(&[(b"a", b"1"), (b"b", b"2")]);
        for cut in 0..good.len() {
            let map = HeaderMapBytes::from_bytes(good[..cut].to_vec());
            assert!(map.pairs().count() <= 2, "cut at {cut}");
            for (_, range) in map.spans() {
                assert!(map.values().get(range).is_some(), "cut at {cut}");
            }
            let _ = map.into_text();
        }
        // Lengths that point past the end, or overflow.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMapBytes::from_bytes(huge).pairs().count(), 0);
        let mut many = good;
        many[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMapBytes::from_bytes(many).pairs().count() <= 2);
    }
}
