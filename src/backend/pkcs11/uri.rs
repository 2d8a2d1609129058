//! The subset of PKCS#11 URIs (RFC 7512) that selects a token.
//!
//! Slot numbers are deliberately not accepted: they change between loads of a module, so a
//! token is named by label, serial, manufacturer or model.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSelector {
    pub label: Option<String>,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
}

impl TokenSelector {
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| format!("'{uri}' is not a pkcs11: URI"))?;
        if rest.contains('?') {
            return Err("query attributes (pin-source, module-path) are not accepted in the token URI; use the config file".into());
        }
        let mut sel = TokenSelector::default();
        for attr in rest.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| format!("attribute '{attr}' has no '='"))?;
            let v = percent_decode(v)?;
            let slot = match k {
                "token" => &mut sel.label,
                "serial" => &mut sel.serial,
                "manufacturer" => &mut sel.manufacturer,
                "model" => &mut sel.model,
                other => {
                    return Err(format!(
                        "attribute '{other}' is not supported; use token, serial, manufacturer or model"
                    ))
                }
            };
            if slot.replace(v).is_some() {
                return Err(format!("attribute '{k}' given twice"));
            }
        }
        if sel.label.is_none() && sel.serial.is_none() {
            return Err("the URI must name the token by 'token' (label) or 'serial'".into());
        }
        Ok(sel)
    }

    /// PKCS#11 pads these fields with spaces; compare trimmed.
    pub fn matches(&self, label: &str, serial: &str, manufacturer: &str, model: &str) -> bool {
        let ok = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w == have.trim_end())
        };
        ok(&self.label, label)
            && ok(&self.serial, serial)
            && ok(&self.manufacturer, manufacturer)
            && ok(&self.model, model)
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 after decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_label_and_serial() {
        let s = TokenSelector::parse("pkcs11:token=tillkey%20dev;serial=abc").unwrap();
        assert_eq!(s.label.as_deref(), Some("tillkey dev"));
        assert_eq!(s.serial.as_deref(), Some("abc"));
        assert!(s.matches("tillkey dev      ", "abc", "x", "y"));
        assert!(!s.matches("tillkey dev", "abd", "x", "y"));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for bad in [
            "token=x",
            "pkcs11:",
            "pkcs11:slot-id=0",
            "pkcs11:token=a;token=b",
            "pkcs11:token=a?pin-value=1234",
            "pkcs11:token=%zz",
            "pkcs11:model=x",
        ] {
            assert!(TokenSelector::parse(bad).is_err(), "{bad}");
        }
    }
}
