//! Text that came from outside (a peer's hello, an access request's host, a refusal reason a
//! connector sent, a TLS error naming what a peer presented) on its way into status, logs or
//! metrics: control characters escaped and the length capped, once, where it comes in.
//!
//! Escaped: C0 and C1 controls and DEL (terminal escape sequences, fake lines), and the Unicode
//! format characters that reorder or hide text on a terminal (bidi overrides and isolates,
//! zero-width characters, line and paragraph separators, the BOM). Everything else, including
//! non-ASCII letters, is kept.

/// Longest peer-supplied text kept for status and logs, in characters: a refusal reason or a
/// transport reason is one line an operator reads; 256 holds any reason the daemon writes
/// itself, with the names it quotes, and 25 of them keep the status reply small.
pub const PEER_TEXT: usize = 256;
/// Longest name (identity, host) shown: a DNS name is at most 253 characters.
pub const PEER_NAME: usize = 253;
/// What marks a cut.
pub const ELLIPSIS: char = '…';

/// Whether `c` must not reach a terminal or a log line as is.
fn must_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' // zero-width space, joiners, LRM/RLM
            | '\u{2028}'..='\u{202e}' // line/paragraph separators, bidi embeddings/overrides
            | '\u{2060}'..='\u{2069}' // word joiner, invisible operators, bidi isolates
            | '\u{feff}') // BOM / zero-width no-break space
}

/// How `c` is written: itself, or a visible escape (`\n`, `\t`, `\r`, `\u{1b}`).
fn escaped(c: char, out: &mut String) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if must_escape(c) => {
            use std::fmt::Write;
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// `s` with its control and format characters escaped, at most `max` characters long (an
/// escape counts as the characters it takes); a longer text is cut at a character boundary
/// and ends in [`ELLIPSIS`]. An escape is never cut in half.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)));
    let mut used = 0usize;
    let mut piece = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        piece.clear();
        escaped(c, &mut piece);
        let n = piece.chars().count();
        let last = chars.peek().is_none();
        // Room for this piece, and for the ellipsis unless this is the end of the text.
        let room = if last { max } else { max.saturating_sub(1) };
        if used + n > room {
            if max > 0 {
                out.push(ELLIPSIS);
            }
            return out;
        }
        out.push_str(&piece);
        used += n;
    }
    out
}

/// Whether `s` would pass [`clean`] unchanged with `max`.
pub fn is_clean(s: &str, max: usize) -> bool {
    s.chars().count() <= max && !s.chars().any(must_escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_visibly() {
        assert_eq!(
            clean("a\nrefused: x\x1b[31m\r\tb", 100),
            "a\\nrefused: x\\u{1b}[31m\\r\\tb"
        );
        assert_eq!(clean("\u{7f}\u{85}", 100), "\\u{7f}\\u{85}");
        assert_eq!(
            clean("abc\u{202e}fed\u{200b}", 100),
            "abc\\u{202e}fed\\u{200b}"
        );
        assert_eq!(clean("café ✓ 東京", 100), "café ✓ 東京", "letters stay");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis_and_never_mid_escape() {
        assert_eq!(clean("abcdef", 6), "abcdef", "exactly max fits");
        assert_eq!(clean("abcdefg", 6), "abcde…");
        assert_eq!(
            clean(&"x".repeat(65_536), PEER_TEXT).chars().count(),
            PEER_TEXT
        );
        // "ab" then an escape of 6 characters that does not fit before the ellipsis.
        assert_eq!(clean("ab\x1bcd", 7), "ab…");
        assert_eq!(clean("東京東京", 3), "東京…");
        assert_eq!(clean("", 0), "");
        assert_eq!(clean("a", 0), "");
    }

    #[test]
    fn is_clean_agrees_with_clean() {
        for s in ["ops-alice", "a\nb", "x".repeat(300).as_str(), "\u{2066}"] {
            assert_eq!(is_clean(s, PEER_NAME), clean(s, PEER_NAME) == s, "{s:?}");
        }
    }
}
