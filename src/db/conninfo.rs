//! Taking libpq's TLS parameters out of a connection string before tokio-postgres reads it:
//! it knows `sslmode` only as disable, prefer or require, and neither `sslrootcert`, `sslcert`
//! nor `sslkey`.

use std::path::PathBuf;

use super::tls::TlsParams;

/// The parameters taken out.
const TAKEN: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `conninfo` (a `postgres://` URL or a `key=value` string) into the string without the
/// TLS parameters and those parameters. A string this cannot read is returned whole, for
/// tokio-postgres to say what is wrong with it.
pub(crate) fn split_tls(conninfo: &str) -> Result<(String, TlsParams), String> {
    let taken = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        split_url(conninfo)
    } else {
        split_key_values(conninfo)
    };
    let Some((rest, pairs)) = taken else { return Ok((conninfo.to_owned(), TlsParams::default())) };
    let mut params = TlsParams::default();
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" => params.sslmode = Some(value.parse()?),
            "sslrootcert" => params.sslrootcert = Some(value),
            "sslcert" => params.sslcert = Some(PathBuf::from(value)),
            _ => params.sslkey = Some(PathBuf::from(value)),
        }
    }
    Ok((rest, params))
}

type Split = (String, Vec<(String, String)>);

/// `postgres://…?a=b&sslmode=verify-full`: the query's TLS parameters, percent-decoded.
fn split_url(url: &str) -> Option<Split> {
    // The query starts after the credentials, which tokio-postgres takes up to the first `@`
    // (a password may hold a `?`).
    let authority = url.find('@').map_or(0, |at| at + 1);
    let Some(mark) = url[authority..].find('?').map(|q| authority + q) else {
        return Some((url.to_owned(), Vec::new()));
    };
    let (base, query) = (&url[..mark], &url[mark + 1..]);
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let key = percent_decode(key)?;
        if TAKEN.contains(&key.as_str()) {
            taken.push((key, percent_decode(value)?));
        } else {
            kept.push(part);
        }
    }
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Some((rest, taken))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `host=x sslrootcert='/a b/ca.pem'`: libpq's grammar, values bare or single-quoted with
/// backslash escapes. The rest is written back with every value quoted.
fn split_key_values(text: &str) -> Option<Split> {
    let mut chars = text.chars().peekable();
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(if c == '\\' { chars.next()? } else { c });
            }
        }
        if TAKEN.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")));
        }
    }
    Some((kept.join(" "), taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tls::SslMode;

    #[test]
    fn url_parameters_are_taken_out_and_decoded() {
        let (rest, params) = split_tls(
            "postgres://app:pw@db.example.com:5433/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fmy%20ca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://app:pw@db.example.com:5433/shop?application_name=x");
        assert_eq!(params.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        let (rest, params) = split_tls("postgresql://h/db?sslcert=/c.pem&sslkey=/k.pem").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(params.sslcert, Some(PathBuf::from("/c.pem")));
        assert_eq!(params.sslkey, Some(PathBuf::from("/k.pem")));
        assert_eq!(split_tls("postgres://h/db").unwrap().0, "postgres://h/db");
        let (rest, params) = split_tls("postgres://u:p?w@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://u:p?w@h/db");
        assert_eq!(params.sslmode, Some(SslMode::Require));
    }

    #[test]
    fn key_value_strings_keep_their_other_parameters() {
        let (rest, params) = split_tls(
            "host=127.0.0.1 port = 5432 sslmode=verify-ca user=o\\'brien sslrootcert='/a b/c\\'a.pem' password='p w'",
        )
        .unwrap();
        assert_eq!(rest, "host='127.0.0.1' port='5432' user='o\\'brien' password='p w'");
        assert_eq!(params.sslmode, Some(SslMode::VerifyCa));
        assert_eq!(params.sslrootcert.as_deref(), Some("/a b/c'a.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_user(), Some("o'brien"));
        assert_eq!(parsed.get_password(), Some(&b"p w"[..]));
    }

    #[test]
    fn an_unknown_sslmode_is_an_error_naming_the_valid_ones() {
        let e = split_tls("host=h sslmode=verify").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
    }

    #[test]
    fn a_string_that_cannot_be_read_is_left_for_tokio_postgres() {
        let (rest, params) = split_tls("host='unterminated sslmode=require").unwrap();
        assert_eq!(rest, "host='unterminated sslmode=require");
        assert_eq!(params, TlsParams::default());
        assert!(rest.parse::<tokio_postgres::Config>().is_err());
    }
}
