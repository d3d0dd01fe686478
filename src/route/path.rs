//! The request path as tollgate routes on it and forwards it.
//!
//! A paywall is only as strong as the agreement between what it priced and what the
//! origin serves. Origins read paths differently: Flask and most WSGI/ASGI servers
//! percent-decode before routing (`%2F` included), Tomcat, Jetty and Spring drop
//! `;parameters` from each segment (so `/free/..;/paid` is `/paid` to them), IIS treats
//! `\` and `%5C` as `/`, Express matches case-insensitively and ignores a trailing
//! slash. So tollgate:
//!
//! 1. puts the path in its RFC 3986 §6.2.2 normal form ([`normalize`]): escapes of
//!    unreserved characters decoded, other escapes upper-cased, dot segments removed,
//!    repeated slashes merged. This is the path routed on **and the path forwarded**,
//!    so the origin never sees a `..` that tollgate resolved differently;
//! 2. refuses (400) what has no safe normal form: a backslash (raw or `%5C`), an
//!    escaped control character, and a segment that turns into `.` or `..` once an
//!    origin decodes it (again) or strips its `;parameters` (`..;`, `%252e%252e`,
//!    `..%2F`);
//! 3. matches routes a second time on the *folded* path ([`fold`]): fully decoded,
//!    `;parameters` stripped, lower-cased, without a trailing slash. When the folded
//!    path reaches a priced route the normal one did not, the request is priced (see
//!    `RouteTable::resolve`). The rule is in ARCHITECTURE.md.
//!
//! Everything works on bytes: a `%` followed by a multi-byte character is just three
//! bytes that are not an escape.

use std::borrow::Cow;

/// Why a path has no safe normal form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains a backslash, which some servers read as '/'")]
    Backslash,
    #[error("the path contains an escaped control character")]
    ControlCharacter,
    #[error("a path segment becomes '.' or '..' once decoded or stripped of ';' parameters")]
    HiddenDotSegment,
}

/// How many times an origin might percent-decode a path (servers behind servers).
const DECODE_ROUNDS: usize = 4;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte an escape at `bytes[i]` stands for, if `bytes[i..i + 3]` is one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    Some(hex_value(*bytes.get(i + 1)?)? << 4 | hex_value(*bytes.get(i + 2)?)?)
}

/// Decodes every escape once (what a decoding origin does).
fn decode_all(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match escape_at(bytes, i) {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The RFC 3986 normal form of `raw`, forwarded upstream; see the module docs.
/// A path that does not start with `/` (`OPTIONS *`) is returned unchanged.
pub(crate) fn normalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Ok(Cow::Borrowed(raw));
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    let plain = !bytes.contains(&b'%') && !bytes.contains(&b';') && !bytes.windows(2).any(|w| w == b"//" || w == b"/.");
    if plain {
        return Ok(Cow::Borrowed(raw));
    }

    // Escapes: unreserved ones decoded, the rest kept with upper-case hex.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match escape_at(bytes, i) {
            Some(b) if is_unreserved(b) => decoded.push(b),
            Some(b) if b < 0x20 || b == 0x7f => return Err(PathError::ControlCharacter),
            Some(b'\\') => return Err(PathError::Backslash),
            Some(_) => decoded.extend(bytes[i..i + 3].iter().map(u8::to_ascii_uppercase)),
            None => {
                decoded.push(bytes[i]);
                i += 1;
                continue;
            }
        }
        i += 3;
    }

    // Dot segments removed (RFC 3986 §5.2.4), empty segments merged.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded.split(|&b| b == b'/').skip(1) {
        trailing_slash = matches!(seg, b"" | b"." | b"..");
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    for seg in &segments {
        check_segment(seg)?;
    }
    let mut out = Vec::with_capacity(decoded.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    // Only ASCII bytes were decoded or rewritten, so multi-byte characters are intact.
    String::from_utf8(out).map(Cow::Owned).map_err(|_| PathError::ControlCharacter)
}

/// Refuses a normalised segment that some origin would still read as a dot segment or
/// a path separator trick.
fn check_segment(seg: &[u8]) -> Result<(), PathError> {
    let mut current = seg.to_vec();
    for _ in 0..DECODE_ROUNDS {
        for piece in current.split(|&b| b == b'/' || b == b'\\') {
            let piece = piece.split(|&b| b == b';').next().unwrap_or_default();
            if piece == b"." || piece == b".." {
                return Err(PathError::HiddenDotSegment);
            }
        }
        if current.contains(&b'\\') {
            return Err(PathError::Backslash);
        }
        if current.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err(PathError::ControlCharacter);
        }
        if !current.contains(&b'%') {
            break;
        }
        current = decode_all(&current);
    }
    Ok(())
}

/// The folded form of a normalised path: the widest common reading of it (fully
/// decoded, `;parameters` stripped, lower-case, no empty segments, no trailing slash).
pub(crate) fn fold(normal: &str) -> Cow<'_, str> {
    let b = normal.as_bytes();
    let already = !b.iter().any(|&c| c == b'%' || c == b';' || c.is_ascii_uppercase() || !c.is_ascii())
        && !b.windows(2).any(|w| w == b"//")
        && (b.len() <= 1 || b.last() != Some(&b'/'));
    if already {
        return Cow::Borrowed(normal);
    }
    let mut bytes = b.to_vec();
    for _ in 0..DECODE_ROUNDS {
        if !bytes.contains(&b'%') {
            break;
        }
        bytes = decode_all(&bytes);
    }
    let mut out = String::with_capacity(bytes.len());
    for seg in bytes.split(|&b| b == b'/') {
        let seg = seg.split(|&b| b == b';').next().unwrap_or_default();
        if seg.is_empty() {
            continue;
        }
        out.push('/');
        out.push_str(&String::from_utf8_lossy(seg).to_lowercase());
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// The catch-all prefix (`/*`, stored as "") stays empty.
pub(crate) fn fold_pattern(p: &str) -> String {
    if p.is_empty() {
        String::new()
    } else {
        fold(p).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_form_decodes_unreserved_and_removes_dot_segments() {
        let ok = |raw: &str| normalize(raw).unwrap().into_owned();
        assert_eq!(ok("/v1/%63hat/x"), "/v1/chat/x");
        assert_eq!(ok("/docs/../v1/chat/x"), "/v1/chat/x");
        assert_eq!(ok("/docs/%2e%2e/v1/chat"), "/v1/chat");
        assert_eq!(ok("/docs/%2E./v1/chat"), "/v1/chat");
        assert_eq!(ok("//v1//chat/"), "/v1/chat/");
        assert_eq!(ok("/a/%3fb"), "/a/%3Fb");
        assert_eq!(ok("/a/b%2fc"), "/a/b%2Fc");
        assert_eq!(ok("/../.."), "/");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/bad%zz"), "/bad%zz");
        assert_eq!(ok("/end%4"), "/end%4");
        assert_eq!(ok("/end%"), "/end%");
        assert_eq!(ok("/plain/path"), "/plain/path");
        assert_eq!(ok("/caf%C3%A9/x"), "/caf%C3%A9/x");
        assert_eq!(ok("/a;v=1/b"), "/a;v=1/b");
        assert_eq!(ok("*"), "*");
    }

    #[test]
    fn percent_before_a_multibyte_character_is_not_an_escape() {
        assert_eq!(normalize("/a%é/b").unwrap(), "/a%é/b");
        assert_eq!(normalize("/%€").unwrap(), "/%€");
        assert_eq!(normalize("/%1€").unwrap(), "/%1€");
        assert_eq!(fold("/A%é"), "/a%é");
    }

    #[test]
    fn paths_without_a_safe_normal_form_are_refused() {
        let cases = [
            ("/free/..;/paid", PathError::HiddenDotSegment),
            ("/free/..;jsessionid=x/paid", PathError::HiddenDotSegment),
            ("/free/.;/paid", PathError::HiddenDotSegment),
            ("/free/%2e%2e;/paid", PathError::HiddenDotSegment),
            ("/free/..%2Fpaid", PathError::HiddenDotSegment),
            ("/free/%2F..%2Fpaid", PathError::HiddenDotSegment),
            ("/free/%252e%252e/paid", PathError::HiddenDotSegment),
            ("/free/%25252e%25252e/paid", PathError::HiddenDotSegment),
            ("/free/%2e%2e%3b/paid", PathError::HiddenDotSegment),
            ("/free\\..\\paid", PathError::Backslash),
            ("/free/%5C../paid", PathError::Backslash),
            ("/free/%5c", PathError::Backslash),
            ("/free/%255C", PathError::Backslash),
            ("/free/%00", PathError::ControlCharacter),
            ("/free/%0a", PathError::ControlCharacter),
            ("/free/%250a", PathError::ControlCharacter),
            ("/free/%7F", PathError::ControlCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn folding_is_the_widest_reading() {
        assert_eq!(fold("/Paid/X/"), "/paid/x");
        assert_eq!(fold("/paid;a=b/x;c"), "/paid/x");
        assert_eq!(fold("/paid%2Fx"), "/paid/x");
        assert_eq!(fold("/paid%252Fx"), "/paid/x");
        assert_eq!(fold("/"), "/");
        assert_eq!(fold_pattern(""), "");
        assert_eq!(fold_pattern("/V1/Chat/"), "/v1/chat");
    }

    // === properties (the normaliser's fuzz targets, run by `cargo test`) ===

    use proptest::prelude::*;

    /// Paths made of the pieces that matter to normalisers, plus arbitrary text.
    fn tricky_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("%".to_owned()),
            Just(";".to_owned()),
            Just("\\".to_owned()),
            "%[0-9a-fA-F]{2}",
            "%25[0-9a-fA-F]{2}",
            "[a-zA-Z]{1,4}",
            any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn normalize_never_panics_on_any_text(s in any::<String>()) {
            let _ = normalize(&s);
            let _ = fold(&s);
        }

        #[test]
        fn the_normal_form_is_stable_and_free_of_dot_segments(raw in tricky_path()) {
            if let Ok(n) = normalize(&raw) {
                prop_assert!(n.starts_with('/'));
                let again = normalize(&n).map(Cow::into_owned);
                prop_assert_eq!(again, Ok(n.clone().into_owned()), "normalising twice changed {}", raw);
                for seg in n.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{} kept a dot segment: {}", raw, n);
                }
                prop_assert!(!n.contains("//"));
                let f = fold(&n);
                prop_assert_eq!(fold(&f), f.clone());
                // The folded form has no dot segment an origin could still resolve.
                for seg in f.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{} folds to a dot segment: {}", raw, f);
                }
            }
        }
    }
}
