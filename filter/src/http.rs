//! HTTP details the flow depends on: cookies, query strings, paths, redirect targets.

use url::Url;

use crate::config::path_has_prefix;

/// Cookies from every `Cookie` header of a request, in order. HTTP/2 allows a client to split the
/// cookie list over several headers (RFC 9113 §8.2.3), so they are joined, never rejected.
pub fn parse_cookies<'a>(headers: impl IntoIterator<Item = &'a str>) -> Vec<(&'a str, &'a str)> {
    parse_pairs(headers).0
}

/// The well-formed `(name, value)` pairs and the number of non-blank pieces: pairs split on `;`,
/// trimmed; a pair without `=` or with an empty name is skipped, as browsers do.
fn parse_pairs<'a>(headers: impl IntoIterator<Item = &'a str>) -> (Vec<(&'a str, &'a str)>, usize) {
    let mut pairs = Vec::new();
    let mut pieces = 0;
    for header in headers {
        for piece in split_on_byte(header, b';') {
            let piece = piece.trim();
            if piece.is_empty() {
                continue;
            }
            pieces += 1;
            let Some((name, value)) = piece.split_once('=') else {
                continue;
            };
            let name = name.trim_end();
            if !name.is_empty() {
                pairs.push((name, value.trim_start().trim_matches('"')));
            }
        }
    }
    (pairs, pieces)
}

/// The pieces of `text` between occurrences of the ASCII byte `sep`, as `str::split` gives them.
fn split_on_byte(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match find_byte(current.as_bytes(), sep).and_then(|i| {
            // `sep` is ASCII, so both sides of it are whole UTF-8.
            Some((current.get(..i)?, current.get(i + 1..)?))
        }) {
            Some((piece, after)) => {
                rest = Some(after);
                Some(piece)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// Where `needle` first occurs in `haystack`, sixteen bytes per step (two `u64` words; core's
/// `memchr` behind `str::split` steps two `usize` words, eight bytes in wasm32). A 1-4 KB
/// session cookie is scanned for `;` on every request.
pub(crate) fn find_byte(haystack: &[u8], needle: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const STEP: usize = 16;
    let pattern = ONES * u64::from(needle);
    // Non-zero exactly when some byte of `word` is `needle` (a zero byte after the xor).
    let has_needle = |word: u64| {
        let x = word ^ pattern;
        x.wrapping_sub(ONES) & !x & HIGHS
    };
    let mut skipped = 0;
    for chunk in haystack.chunks_exact(STEP) {
        let Some((low, rest)) = chunk.split_first_chunk::<8>() else {
            break;
        };
        let Ok(high) = <&[u8; 8]>::try_from(rest) else {
            break;
        };
        if has_needle(u64::from_le_bytes(*low)) | has_needle(u64::from_le_bytes(*high)) != 0 {
            break;
        }
        skipped += STEP;
    }
    let tail = haystack.get(skipped..)?;
    tail.iter().position(|&b| b == needle).map(|i| skipped + i)
}

/// The cookies of a request, parsed in one pass over each `Cookie` header.
///
/// A session cookie is 1-4 KB and every request carries it, so the header is scanned once: the
/// `cookie` crate's parser (used before) walked each pair twice, and the forwarded header was
/// rebuilt with a third walk.
#[derive(Debug, Default)]
pub struct CookieList<'a> {
    /// The headers parsed (what [`CookieList::header_without`] forwards or rebuilds).
    headers: &'a [&'a str],
    /// `(name, value)` of each well-formed pair, value without surrounding quotes.
    pub pairs: Vec<(&'a str, &'a str)>,
    /// Non-blank pairs seen, well-formed or not.
    pieces: usize,
}

impl<'a> CookieList<'a> {
    /// Parses every header (see [`parse_cookies`]).
    pub fn parse(headers: &'a [&'a str]) -> Self {
        let (pairs, pieces) = parse_pairs(headers.iter().copied());
        CookieList {
            headers,
            pairs,
            pieces,
        }
    }

    /// The `Cookie` header to forward once `drop` removed its cookies (as
    /// [`cookie_header_without`]), without another pass when nothing or everything is dropped.
    pub fn header_without(&self, drop: impl Fn(&str) -> bool) -> Option<String> {
        if self.pieces == 0 {
            // Only separators and blanks: no cookie to forward (as the rebuild would find).
            return None;
        }
        let dropped = self.pairs.iter().filter(|(n, _)| drop(n)).count();
        if dropped == 0 && self.pieces == self.pairs.len() {
            return match self.headers {
                [] => None,
                [one] => Some(one.trim().to_string()).filter(|h| !h.is_empty()),
                _ => cookie_header_without(self.headers, drop),
            };
        }
        if dropped == self.pieces {
            return None;
        }
        cookie_header_without(self.headers, drop)
    }
}

impl<'a> std::ops::Deref for CookieList<'a> {
    type Target = [(&'a str, &'a str)];

    fn deref(&self) -> &Self::Target {
        &self.pairs
    }
}

/// Rebuilds a `Cookie` header without the cookies `drop` selects; `None` when nothing is left.
pub fn cookie_header_without(headers: &[&str], drop: impl Fn(&str) -> bool) -> Option<String> {
    let kept: Vec<String> = headers
        .iter()
        .flat_map(|h| h.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n).trim();
            !drop(name)
        })
        .map(str::to_string)
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(kept.join("; "))
    }
}

/// A parsed query string in which every parameter appears at most once.
#[derive(Debug, Default)]
pub struct StrictQuery {
    pairs: Vec<(String, String)>,
}

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A parameter the flow relies on appears twice (RFC 6749 §3.1: "MUST NOT be included more than once").
    #[error("parameter `{0}` appears more than once")]
    Duplicate(String),
    /// The query is too long to be a real callback.
    #[error("query too long")]
    TooLong,
    /// More parameters than any real callback has.
    #[error("too many parameters")]
    TooMany,
}

/// Longest callback query accepted; real ones are a few hundred bytes.
pub const MAX_QUERY_LEN: usize = 8 * 1024;

/// Most parameters in a callback query accepted. Real ones have up to about ten (`code`,
/// `state`, `iss`, `session_state`, `scope`, Google's `authuser`, `hd`, `prompt`); the bound keeps
/// the duplicate check cheap for a query of thousands of one-letter parameters, which anyone
/// can send to the callback path without signing in.
pub const MAX_QUERY_PARAMS: usize = 32;

impl StrictQuery {
    /// Parses `query` (without `?`), refusing repeated parameters.
    pub fn parse(query: &str) -> Result<Self, QueryError> {
        if query.len() > MAX_QUERY_LEN {
            return Err(QueryError::TooLong);
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if pairs.len() == MAX_QUERY_PARAMS {
                return Err(QueryError::TooMany);
            }
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(QueryError::Duplicate(k.into_owned()));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Self { pairs })
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits `:path` into path and query; a fragment (never sent by browsers) is cut off.
pub fn split_path(path: &str) -> (&str, &str) {
    // Byte searches: `#` and `?` are ASCII, and the `str` searchers cost more than a whole short
    // path takes to scan (this runs several times per request).
    let path = find_byte(path.as_bytes(), b'#')
        .and_then(|i| path.get(..i))
        .unwrap_or(path);
    match find_byte(path.as_bytes(), b'?').and_then(|i| Some((path.get(..i)?, path.get(i + 1..)?)))
    {
        Some((p, q)) => (p, q),
        None => (path, ""),
    }
}

/// Whether `path` may skip login under one of `prefixes`.
///
/// Fail closed: a path whose meaning an upstream could read differently (escaped slashes or dots,
/// `;` parameters, backslashes, `.`/`..` segments, `//`) never skips, even when it starts with a
/// skipped prefix. That closes `/public/..%2fprivate` and `/public/%2e%2e/private` style bypasses.
pub fn skip_path_matches(raw_path: &str, prefixes: &[String]) -> bool {
    let (path, _) = split_path(raw_path);
    // One pass over the bytes (every request with skip paths configured runs this). Non-ASCII
    // is refused too: an upstream that normalises Unicode reads U+2025 as `..` and U+FF0F as `/`.
    let bytes = path.as_bytes();
    let mut segment_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // Any `%` (valid `%XX`, IIS-style `%u002e`, or a lone `%`) means an upstream could decode
        // the path into something else: no skip.
        if matches!(b, b'\\' | b';' | b'%') || !b.is_ascii() || b.is_ascii_control() {
            return false;
        }
        if b == b'/' {
            let segment = &bytes[segment_start..i];
            // `//` (an empty segment after the first) and dot segments.
            if (i > 0 && segment.is_empty()) || is_dot_segment(segment) {
                return false;
            }
            segment_start = i + 1;
        }
    }
    if is_dot_segment(&bytes[segment_start..]) {
        return false;
    }
    prefixes.iter().any(|p| path_has_prefix(path, p))
}

fn is_dot_segment(segment: &[u8]) -> bool {
    segment == b"." || segment == b".."
}

/// `Url::parse` for the filter: ASCII only. IdP and gateway URLs are ASCII (internationalised
/// hosts in their punycode form), and refusing the rest up front keeps Unicode host processing
/// (and its tables, half the module's data) out of the filter: filter/Cargo.toml pins the
/// ASCII-only `idna_adapter` 1.0, whose debug build asserts on hosts mixing capitals and
/// non-ASCII. A percent-encoded host (`Z%c3%a9`) is non-ASCII in disguise and refused too.
pub fn parse_url(raw: &str) -> Result<Url, url::ParseError> {
    // The authority as the URL parser reads it: after the scheme and any run of slashes or
    // backslashes (`https:host`, `https:\\host` parse as `https://host`).
    let authority = raw
        .split_once(':')
        .map(|(_, rest)| {
            let rest = rest.trim_start_matches(['/', '\\']);
            rest.split(['/', '\\', '?', '#']).next().unwrap_or(rest)
        })
        .unwrap_or_default();
    if raw.is_ascii() && !authority.contains('%') {
        Url::parse(raw)
    } else {
        Err(url::ParseError::IdnaError)
    }
}

/// The absolute URL to send the browser to after login, from the original request's path.
///
/// Only same-origin targets are possible: the stored value is a path, and the result is checked to
/// have exactly the expected scheme, host and port. Anything odd becomes `/`.
pub fn same_origin_target(scheme: &str, authority: &str, path: &str) -> String {
    let origin = format!("{scheme}://{authority}");
    let safe_path = sanitize_return_path(path);
    let candidate = format!("{origin}{safe_path}");
    match (parse_url(&origin), parse_url(&candidate)) {
        (Ok(o), Ok(c)) if o.origin() == c.origin() && c.username().is_empty() => c.to_string(),
        _ => format!("{origin}/"),
    }
}

/// A return path that cannot be read as another origin: must start with a single `/`, no
/// backslashes, no control characters or whitespace, bounded length.
pub fn sanitize_return_path(path: &str) -> &str {
    const MAX_RETURN_PATH: usize = 2048;
    let bytes = path.as_bytes();
    let bad = path.len() > MAX_RETURN_PATH
        || bytes.first() != Some(&b'/')
        || bytes.get(1) == Some(&b'/')
        || path.contains('\\')
        || bytes
            .iter()
            .any(|b| b.is_ascii_control() || *b == b' ' || *b >= 0x80)
        || path.to_ascii_lowercase().contains("%5c")
        || path
            .get(1..4)
            .is_some_and(|p| p.eq_ignore_ascii_case("%2f"));
    if bad {
        "/"
    } else {
        path
    }
}

/// Escapes text for an HTML body.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            _ => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query component (application/x-www-form-urlencoded).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, v);
    }
    ser.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Haystacks of a few letters around every length and alignment of the 16-byte steps.
        #[test]
        fn find_byte_finds_the_first_occurrence(
            hay in proptest::collection::vec(prop_oneof![Just(b';'), Just(b'a'), Just(0x80u8), Just(0u8), Just(0xffu8), any::<u8>()], 0..80),
            needle in prop_oneof![Just(b';'), Just(0u8), Just(0x80u8), Just(0xffu8), any::<u8>()],
        ) {
            prop_assert_eq!(find_byte(&hay, needle), hay.iter().position(|&b| b == needle));
        }

        #[test]
        fn parse_url_refuses_non_ascii_hosts_in_any_spelling(
            host in "[A-Za-z%c39éßΑ]{1,8}",
            after_scheme in prop_oneof![Just("//"), Just(""), Just("\\\\"), Just("//user@")],
        ) {
            let url = format!("https:{after_scheme}{host}/p?q=%41");
            let parsed = parse_url(&url);
            if !host.is_ascii() || host.contains('%') {
                prop_assert!(parsed.is_err(), "{}", url);
            } else {
                prop_assert!(parsed.is_ok(), "{}", url);
            }
        }

        // The `str`-searcher versions these replaced are the reference.
        #[test]
        fn split_path_and_strip_port_match_their_str_versions(text in "[a/?#:0-9\\[\\]é]{0,40}") {
            let reference = |path: &str| -> (String, String) {
                let path = path.split('#').next().unwrap_or(path);
                match path.split_once('?') {
                    Some((p, q)) => (p.into(), q.into()),
                    None => (path.into(), String::new()),
                }
            };
            let (p, q) = split_path(&text);
            prop_assert_eq!((p.to_string(), q.to_string()), reference(&text));
            let port_reference = |a: &str| -> String {
                if a.starts_with('[') {
                    return match a.find(']') {
                        Some(end) => a[..=end].into(),
                        None => a.into(),
                    };
                }
                a.split(':').next().unwrap_or(a).into()
            };
            prop_assert_eq!(crate::config::strip_port(&text), port_reference(&text));
        }

        #[test]
        fn split_on_byte_splits_as_str_split(text in "[a;=é ]{0,70}") {
            let ours: Vec<&str> = split_on_byte(&text, b';').collect();
            let std: Vec<&str> = text.split(';').collect();
            prop_assert_eq!(ours, std);
        }
    }

    #[test]
    fn find_byte_at_each_position_of_a_long_haystack() {
        for len in 0..50 {
            for at in 0..len {
                let mut hay = vec![b'x'; len];
                hay[at] = b';';
                if at + 3 < len {
                    hay[at + 3] = b';';
                }
                assert_eq!(find_byte(&hay, b';'), Some(at), "len {len}, at {at}");
            }
            assert_eq!(find_byte(&vec![b'x'; len], b';'), None, "len {len}");
        }
    }

    #[test]
    fn cookie_list_forwards_without_a_second_pass_when_it_can() {
        let own = |n: &str| n.starts_with("__Host-oidc-gate");
        // Only ours: nothing to forward.
        let h = ["__Host-oidc-gate=abc; __Host-oidc-gate-1=def"];
        assert_eq!(CookieList::parse(&h).header_without(own), None);
        // None of ours: the client's header as sent.
        let h = ["a=1;b=\"2\""];
        assert_eq!(
            CookieList::parse(&h).header_without(own).as_deref(),
            Some("a=1;b=\"2\"")
        );
        // Mixed, or anything malformed: rebuilt without ours.
        let h = ["a=1; __Host-oidc-gate=x; b=2"];
        assert_eq!(
            CookieList::parse(&h).header_without(own).as_deref(),
            Some("a=1; b=2")
        );
        let h = ["__Host-oidc-gate=x; junk"];
        assert_eq!(
            CookieList::parse(&h).header_without(own).as_deref(),
            Some("junk")
        );
        let h = ["a=1", "__Host-oidc-gate=x"];
        assert_eq!(
            CookieList::parse(&h).header_without(own).as_deref(),
            Some("a=1")
        );
        assert_eq!(CookieList::parse(&[]).header_without(own), None);
        // Separators only (found by `make fuzz`): no cookie, as the rebuild says.
        assert_eq!(CookieList::parse(&[";"]).header_without(own), None);
        assert_eq!(CookieList::parse(&[" ; ;"]).header_without(own), None);
    }

    #[test]
    fn cookie_list_parses_like_browsers_send() {
        let list = CookieList::parse(&[" a = 1 ;; =x; noeq ; b=\"q\"", "c="]);
        assert_eq!(&list[..], &[("a", "1"), ("b", "q"), ("c", "")]);
    }

    #[test]
    fn parses_cookies_across_headers() {
        let c = parse_cookies(["a=1; b=2", "c=3"]);
        assert_eq!(c, vec![("a", "1"), ("b", "2"), ("c", "3")]);
    }

    #[test]
    fn removes_selected_cookies() {
        let h = cookie_header_without(&["a=1; __Host-oidc-gate=x", "b=2"], |n| {
            n.starts_with("__Host-oidc-gate")
        });
        assert_eq!(h.as_deref(), Some("a=1; b=2"));
        assert_eq!(
            cookie_header_without(&["__Host-oidc-gate=x"], |_| true),
            None
        );
    }

    #[test]
    fn rejects_duplicate_parameters() {
        assert_eq!(
            StrictQuery::parse("state=a&code=b&state=c").unwrap_err(),
            QueryError::Duplicate("state".into())
        );
        let q = StrictQuery::parse("state=a%2Bb&code=c").unwrap();
        assert_eq!(q.get("state"), Some("a+b"));
        assert_eq!(q.get("iss"), None);
    }

    #[test]
    fn refuses_more_parameters_than_a_callback_has() {
        let query = |n: usize| {
            (0..n)
                .map(|i| format!("p{i}=v"))
                .collect::<Vec<_>>()
                .join("&")
        };
        let most = StrictQuery::parse(&query(MAX_QUERY_PARAMS)).unwrap();
        assert_eq!(most.get("p31"), Some("v"));
        assert_eq!(
            StrictQuery::parse(&query(MAX_QUERY_PARAMS + 1)).unwrap_err(),
            QueryError::TooMany
        );
        // Thousands of short parameters fit in the length bound: they are refused by count.
        let many = query(1000);
        assert!(many.len() <= MAX_QUERY_LEN);
        assert_eq!(StrictQuery::parse(&many).unwrap_err(), QueryError::TooMany);
    }

    #[test]
    fn skip_paths_are_segment_aware_and_fail_closed() {
        let p = vec!["/public/".to_string(), "/healthz".to_string()];
        assert!(skip_path_matches("/healthz", &p));
        assert!(skip_path_matches("/healthz?x=1", &p));
        assert!(skip_path_matches("/healthz/live", &p));
        assert!(skip_path_matches("/public/a.css", &p));
        assert!(!skip_path_matches("/healthzx", &p));
        assert!(!skip_path_matches("/public", &p));
        for bypass in [
            "/public/..%2fsecret",
            "/public/%2e%2e/secret",
            "/public/../secret",
            "/public/./x",
            "/public//x",
            "//public/x",
            "/public/x;y",
            "/public\\..\\secret",
            "/public%2fx",
            "/secret?p=/public/",
            "/secret#/public/",
            "/PUBLIC/x",
            "/public/%u002e%u002e/admin",
            "/public/%/a",
            "/public/%20x",
            // Unicode an upstream may normalise: U+2025 to `..`, U+FF0F to `/`.
            "/public/\u{2025}/secret",
            "/public\u{ff0f}..\u{ff0f}secret",
            "/public/caf\u{e9}",
        ] {
            assert!(
                !skip_path_matches(bypass, &p),
                "{bypass} must not skip login"
            );
        }
    }

    #[test]
    fn return_targets_stay_on_origin() {
        let ok = same_origin_target("https", "app.example.com", "/a/b?x=1");
        assert_eq!(ok, "https://app.example.com/a/b?x=1");
        for evil in [
            "//evil.com",
            "/\\evil.com",
            "/\t/evil.com",
            "/%2f/evil.com",
            "/%5cevil.com",
            "https://evil.com",
            "javascript:alert(1)",
            "/ /evil.com",
            "",
        ] {
            let t = same_origin_target("https", "app.example.com", evil);
            assert!(t.starts_with("https://app.example.com/"), "{evil:?} -> {t}");
            assert_eq!(
                Url::parse(&t).unwrap().host_str(),
                Some("app.example.com"),
                "{evil:?}"
            );
        }
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            html_escape("<script>\"'&"),
            "&lt;script&gt;&quot;&#x27;&amp;"
        );
    }
}
