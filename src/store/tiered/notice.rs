//! What an instance tells the others ([`Notice`]): what changed, encoded with the sender's
//! origin, and the version (the journal's entry id) it travels with.

/// A notification's version: the journal's entry id (milliseconds, sequence).
pub(super) type Version = (u64, u64);

pub(super) fn parse_version(id: &str) -> Option<Version> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What an instance tells the others: what changed, so they drop their copies.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Notice<'a> {
    /// A value stored or replaced.
    Set(&'a str),
    /// A key deleted.
    Key(&'a str),
    /// A tag invalidated: the keys L2 removed, when it could list them.
    Tag(&'a str, Option<Vec<&'a str>>),
    Pattern(&'a str),
    /// Empty L1: too many notifications were lost to tell them one by one.
    Clear,
}

impl<'a> Notice<'a> {
    /// `kind`, the origin in 16 hex digits, then the text.
    pub(super) fn encode(&self, origin: u64) -> Vec<u8> {
        let (kind, text) = match self {
            Notice::Set(key) => (b's', *key),
            Notice::Key(key) => (b'k', *key),
            Notice::Tag(tag, _) => (b't', *tag),
            Notice::Pattern(pattern) => (b'p', *pattern),
            Notice::Clear => (b'c', ""),
        };
        let mut message = Vec::with_capacity(text.len() + 17);
        message.push(kind);
        message.extend_from_slice(format!("{origin:016x}").as_bytes());
        message.extend_from_slice(text.as_bytes());
        if let Notice::Tag(_, Some(keys)) = self {
            // Keys never hold a newline: the layer's are percent-encoded; a key that does is
            // refused by `tag_keys` below, and the tag's copies dropped the wide way.
            for key in keys {
                message.push(b'\n');
                message.extend_from_slice(key.as_bytes());
            }
        }
        message
    }

    /// A notification and its origin (`None` for one without: published by hand or by an
    /// older version of this crate, `kind` then text).
    pub(super) fn decode(message: &'a [u8]) -> Option<(Self, Option<u64>)> {
        let (&kind, rest) = message.split_first()?;
        let (origin, text) = match rest.get(..16).and_then(|hex| std::str::from_utf8(hex).ok()) {
            Some(hex) if kind != b'c' || rest.len() == 16 => match u64::from_str_radix(hex, 16) {
                Ok(origin) => (Some(origin), &rest[16..]),
                Err(_) => (None, rest),
            },
            _ => (None, rest),
        };
        let text = std::str::from_utf8(text).ok()?;
        let notice = match kind {
            b's' => Notice::Set(text),
            b'k' => Notice::Key(text),
            b't' => {
                let mut lines = text.split('\n');
                let tag = lines.next().unwrap_or_default();
                let keys: Vec<&str> = lines.collect();
                Notice::Tag(tag, (!keys.is_empty()).then_some(keys))
            }
            b'p' => Notice::Pattern(text),
            b'c' => Notice::Clear,
            _ => return None,
        };
        Some((notice, origin))
    }

    /// What the notification is about, for the queue's "newest wins": a key's store and
    /// delete are one thing (either drops the copy).
    pub(super) fn what(&self) -> Vec<u8> {
        let (class, text) = match self {
            Notice::Set(key) | Notice::Key(key) => (b'k', *key),
            Notice::Tag(tag, _) => (b't', *tag),
            Notice::Pattern(pattern) => (b'p', *pattern),
            Notice::Clear => (b'c', ""),
        };
        let mut what = vec![class];
        what.extend_from_slice(text.as_bytes());
        what
    }
}

/// A live message: `version notification`, or a bare notification (no version).
pub(super) fn split_version(payload: &[u8]) -> (Option<Version>, &[u8]) {
    if payload.first().is_some_and(u8::is_ascii_digit) {
        if let Some(space) = payload.iter().position(|&b| b == b' ') {
            if let Some(version) = std::str::from_utf8(&payload[..space])
                .ok()
                .and_then(parse_version)
            {
                return (Some(version), &payload[space + 1..]);
            }
        }
    }
    (None, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_round_trip() {
        let origin = 0x0123_4567_89ab_cdef;
        for notice in [
            Notice::Set("a:b"),
            Notice::Key("a:b"),
            Notice::Tag("p:__tag:x", None),
            Notice::Tag("p:__tag:x", Some(vec!["a", "b:c"])),
            Notice::Pattern("p:*"),
            Notice::Clear,
        ] {
            let encoded = notice.encode(origin);
            let (decoded, from) = Notice::decode(&encoded).unwrap();
            assert_eq!(decoded, notice);
            assert_eq!(from, Some(origin));
        }
        // A bare notification, as published by hand: no origin.
        assert_eq!(Notice::decode(b"kk2"), Some((Notice::Key("k2"), None)));
        assert!(Notice::decode(b"").is_none());
        assert!(Notice::decode(b"zkey").is_none());
        assert_eq!(
            split_version(b"1700000000000-3 kx"),
            (Some((1_700_000_000_000, 3)), &b"kx"[..])
        );
        assert_eq!(split_version(b"kx"), (None, &b"kx"[..]));
    }
}
