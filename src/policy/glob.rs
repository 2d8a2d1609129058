//! Globs over `/`-separated names, for key names and client identities alike.
//!
//! `**` as a whole segment matches zero or more segments; `*` inside a segment matches any run
//! of characters within that one segment; everything else matches itself. Small and exact on
//! purpose: a policy author can predict every match, and no regex engine is involved.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    segments: Vec<String>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        let segments: Vec<String> = pattern.split('/').map(str::to_owned).collect();
        if let Some(bad) = segments
            .iter()
            .find(|s| s.contains("**") && s.as_str() != "**")
        {
            return Err(format!("'{bad}': '**' must stand alone as a segment"));
        }
        Ok(Self {
            source: pattern.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Key-name patterns must use the key-name alphabet (plus `*`), so a typo such as an
    /// upper-case letter is an error at load time rather than a grant that silently never
    /// matches.
    pub fn check_key_alphabet(&self) -> Result<(), String> {
        for seg in &self.segments {
            if seg.is_empty() {
                return Err(format!("'{}': empty segment", self.source));
            }
            if !seg
                .bytes()
                .all(|b| crate::keys::is_name_byte(b) || b == b'*')
            {
                return Err(format!(
                    "'{}': key patterns use a-z, 0-9, '.', '_', '-', '*' and '/'",
                    self.source
                ));
            }
        }
        Ok(())
    }

    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        match_segments(&self.segments, &parts, false)
    }

    /// [`Glob::matches`] for client identities, where a wildcard never matches an empty
    /// segment: `officer/*` is not `officer/`, which a certificate's URI could otherwise end in
    /// to pass as every officer. (Key names have no empty segments; a prefix's trailing `/`
    /// still matches `**`, as audit reads of prefix actions need.)
    pub fn matches_identity(&self, identity: &str) -> bool {
        let parts: Vec<&str> = identity.split('/').collect();
        match_segments(&self.segments, &parts, true)
    }

    /// Whether the pattern matches every name under `prefix` (whole segments ending in `/`),
    /// whatever names exist: what a prefix action is judged by, so its answer cannot tell
    /// which keys exist.
    pub fn covers_prefix(&self, prefix: &str) -> bool {
        let parts: Vec<&str> = prefix
            .strip_suffix('/')
            .unwrap_or(prefix)
            .split('/')
            .collect();
        covers(&self.segments, &parts)
    }
}

/// Whether `pat` matches every name that continues `prefix` by one or more segments.
fn covers(pat: &[String], prefix: &[&str]) -> bool {
    match (pat.split_first(), prefix.split_first()) {
        // Beneath the prefix come one or more segments of any kind: taken by a rest made of
        // `**` and at most one `*`.
        (Some(_), None) => {
            pat.iter().any(|p| p == "**")
                && pat.iter().all(|p| p == "**" || p == "*")
                && pat.iter().filter(|p| *p == "*").count() <= 1
        }
        (None, _) => false,
        (Some((p, rest)), Some((_, prefix_rest))) if p == "**" => {
            covers(rest, prefix) || covers(pat, prefix_rest)
        }
        (Some((p, rest)), Some((n, prefix_rest))) => {
            match_within(p.as_bytes(), n.as_bytes()) && covers(rest, prefix_rest)
        }
    }
}

/// With `strict`, wildcards never match an empty segment (see [`Glob::matches_identity`]).
fn match_segments(pat: &[String], name: &[&str], strict: bool) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((p, rest)) if p == "**" => (0..=name.len())
            .take_while(|&i| !strict || i == 0 || !name[i - 1].is_empty())
            .any(|i| match_segments(rest, &name[i..], strict)),
        Some((p, rest)) => match name.split_first() {
            Some((n, name_rest)) => {
                (!strict || !n.is_empty() || p.is_empty())
                    && match_within(p.as_bytes(), n.as_bytes())
                    && match_segments(rest, name_rest, strict)
            }
            None => false,
        },
    }
}

/// `*` wildcard match within one segment (greedy with backtracking to the last star).
fn match_within(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Glob::new(p).unwrap().matches(n)
    }

    #[test]
    fn covers_a_prefix_only_with_a_double_star_beneath_it() {
        let c = |p: &str, prefix: &str| Glob::new(p).unwrap().covers_prefix(prefix);
        assert!(c("**", "stores/"));
        assert!(c("stores/**", "stores/1212/"));
        assert!(c("stores/**", "stores/"));
        assert!(c("stores/*/**", "stores/1212/pos/"));
        assert!(c("stores/12*/**", "stores/1212/"));
        assert!(c("**/**", "stores/"));
        assert!(!c("stores/*", "stores/"));
        assert!(!c("stores/*/pos/*/qr-mac", "stores/1212/pos/0001/"));
        assert!(!c("stores/1212/**", "stores/"));
        assert!(!c("**/qr-mac", "stores/"));
        assert!(!c("stores/13*/**", "stores/1212/"));
        assert!(c("stores/*/**", "stores/"));
        assert!(!c("stores/*/*/**", "stores/"));
    }

    #[test]
    fn identity_wildcards_never_match_an_empty_segment() {
        let id = |p: &str, n: &str| Glob::new(p).unwrap().matches_identity(n);
        assert!(!id("spiffe://t/officer/*", "spiffe://t/officer/"));
        assert!(!id("spiffe://t/officer/**", "spiffe://t/officer/"));
        assert!(!id("spiffe://t/*/eve", "spiffe://t//eve"));
        assert!(id("spiffe://t/officer/*", "spiffe://t/officer/eve"));
        assert!(id("spiffe://t/officer/**", "spiffe://t/officer"));
        assert!(id("spiffe://t/**", "spiffe://t/officer/eve"));
        // Key patterns still match a prefix's trailing empty segment.
        assert!(m("**", "stores/"));
    }

    #[test]
    fn single_star_stays_in_its_segment() {
        assert!(m("stores/*/pos/*/qr-mac", "stores/1212/pos/0001/qr-mac"));
        assert!(!m("stores/*/pos/*/qr-mac", "stores/1212/x/pos/0001/qr-mac"));
        assert!(!m("stores/*", "stores"));
        assert!(m("stores/12*", "stores/1212"));
        assert!(!m("stores/12*", "stores/1312"));
        assert!(m("a/*x*y", "a/zzxqqy"));
        assert!(!m("a/*x*y", "a/zzxqq"));
    }

    #[test]
    fn double_star_spans_segments() {
        assert!(m("stores/**", "stores/1/pos/2/k"));
        assert!(m("stores/**", "stores"));
        assert!(!m("stores/**", "storesx/1"));
        assert!(m("**", "anything/at/all"));
        assert!(m("stores/**/qr-mac", "stores/1/pos/2/qr-mac"));
        assert!(!m("stores/**/qr-mac", "stores/1/pos/2/qr-mac2"));
    }

    #[test]
    fn identities_with_schemes() {
        assert!(m(
            "spiffe://tillkey.test/svc/*",
            "spiffe://tillkey.test/svc/payments"
        ));
        assert!(!m(
            "spiffe://tillkey.test/svc/*",
            "spiffe://evil.test/svc/payments"
        ));
        assert!(!m(
            "spiffe://tillkey.test/svc/*",
            "spiffe://tillkey.test/svc/a/b"
        ));
        assert!(m("payments-server", "payments-server"));
    }

    #[test]
    fn refuses_malformed_patterns() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("a/b**").is_err());
        assert!(Glob::new("Stores/*").unwrap().check_key_alphabet().is_err());
        assert!(Glob::new("a//b").unwrap().check_key_alphabet().is_err());
    }
}
