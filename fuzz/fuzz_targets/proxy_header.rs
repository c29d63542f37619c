//! PROXY v1/v2 headers, as an `accept_proxy` listener reads them from any client.
//!
//! Besides "never panics", checks what the rest of the daemon relies on: a complete
//! header never claims more bytes than it was given, every shorter prefix of it asks for
//! more (so a header split over segments is read the same), and the header re-encoded in
//! either version parses back to itself (what mxlb forwards is what it read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxlb::proxy_header::{ProxyVersion, encode, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, len))) = parse(data) else {
        return;
    };
    assert!(len <= data.len(), "consumed {len} of {} bytes", data.len());
    assert_eq!(parse(&data[..len]), Ok(Some((header, len))));
    for short in 0..len {
        assert_eq!(parse(&data[..short]), Ok(None), "prefix of {short} bytes");
    }
    for version in [ProxyVersion::V1, ProxyVersion::V2] {
        let bytes = encode(version, &header);
        assert_eq!(
            parse(&bytes),
            Ok(Some((header, bytes.len()))),
            "{version:?}"
        );
    }
});
