//! atproto interop syntax fixtures (`interop/syntax/*_syntax_{valid,invalid}.txt`): every valid
//! line must be accepted and every invalid line rejected, by every entry point of `sync_core::ids`
//! (`parse`, `is_valid_*`, `FromStr`, serde). All failures are collected and reported at once.
//!
//! Fixture root: `$SYNC_FIXTURES`, else `<repo>/../shared/fixtures`. Skips if absent.

use std::fmt::{Debug, Display};
use std::path::Path;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sync_core::ids::*;

/// Data lines of a fixture file: not blank, not starting with `#`. Nothing is trimmed (leading and
/// trailing whitespace is significant in the invalid files). Yields (1-based line number, line).
fn data_lines(text: &str) -> Vec<(usize, &str)> {
    text.split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn short(s: &str) -> String {
    if s.len() <= 120 {
        format!("{s:?}")
    } else {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}…({} bytes)", &s[..end], s.len())
    }
}

/// Runs every entry point for `T` on `line`. `Ok(true)` = all accept (and round-trip), `Ok(false)`
/// = all reject, `Err` = the entry points disagree or a round-trip is wrong.
fn run<T>(
    line: &str,
    parse: fn(&str) -> Result<T, IdError>,
    is_valid: fn(&str) -> bool,
    extra: fn(&T, &str) -> Result<(), String>,
) -> Result<bool, String>
where
    T: FromStr<Err = IdError> + Display + Debug + AsRef<str> + Serialize + DeserializeOwned,
{
    let parsed = parse(line);
    let via_from_str = line.parse::<T>();
    let json = serde_json::to_string(line).map_err(|e| e.to_string())?;
    let via_serde_str = serde_json::from_str::<T>(&json);
    let via_serde_owned = serde_json::from_value::<T>(serde_json::Value::String(line.to_owned()));
    let results = [
        parsed.is_ok(),
        is_valid(line),
        via_from_str.is_ok(),
        via_serde_str.is_ok(),
        via_serde_owned.is_ok(),
    ];
    if results.iter().any(|&r| r != results[0]) {
        return Err(format!(
            "entry points disagree [parse, is_valid, from_str, serde str, serde owned] = {results:?}"
        ));
    }
    match parsed {
        Ok(v) => {
            if v.as_ref() != line || v.to_string() != line {
                return Err(format!("round trip changed the text: {v:?}"));
            }
            if serde_json::to_string(&v).map_err(|e| e.to_string())? != json {
                return Err(format!("serde serialization changed the text: {v:?}"));
            }
            extra(&v, line)?;
            Ok(true)
        }
        Err(e) => {
            if e.to_string().len() > 400 {
                return Err(format!(
                    "error message too long ({} bytes)",
                    e.to_string().len()
                ));
            }
            Ok(false)
        }
    }
}

fn no_extra<T>(_: &T, _: &str) -> Result<(), String> {
    Ok(())
}

fn did_extra(d: &Did, line: &str) -> Result<(), String> {
    let rebuilt = format!("did:{}:{}", d.method(), d.method_specific_id());
    (rebuilt == line)
        .then_some(())
        .ok_or_else(|| format!("method split wrong: {rebuilt:?}"))
}

fn nsid_extra(n: &Nsid, line: &str) -> Result<(), String> {
    let rebuilt = format!("{}.{}", n.authority(), n.name());
    (rebuilt == line)
        .then_some(())
        .ok_or_else(|| format!("authority/name split wrong: {rebuilt:?}"))
}

fn aturi_extra(u: &AtUri, line: &str) -> Result<(), String> {
    let mut rebuilt = format!("at://{}", u.authority());
    if let Some(c) = u.collection() {
        Nsid::parse(c).map_err(|e| format!("collection accessor: {e}"))?;
        rebuilt.push('/');
        rebuilt.push_str(c);
    }
    if let Some(r) = u.rkey() {
        if u.collection().is_none() {
            return Err("rkey without collection".into());
        }
        RecordKey::parse(r).map_err(|e| format!("rkey accessor: {e}"))?;
        rebuilt.push('/');
        rebuilt.push_str(r);
    }
    if let Some(d) = u.authority_did() {
        if d.as_str() != u.authority() {
            return Err("authority_did differs from authority".into());
        }
    } else if !is_valid_handle(u.authority()) {
        return Err("authority is neither DID nor handle".into());
    }
    (rebuilt == line)
        .then_some(())
        .ok_or_else(|| format!("accessors rebuild {rebuilt:?}"))
}

fn tid_extra(t: &Tid, _: &str) -> Result<(), String> {
    (Tid::from_u64(t.to_u64()) == *t)
        .then_some(())
        .ok_or_else(|| "u64 round trip failed".into())
}

type Checker = fn(&str) -> Result<bool, String>;

const KINDS: &[(&str, Checker)] = &[
    ("did", |l| run(l, Did::parse, is_valid_did, did_extra)),
    ("handle", |l| {
        run(l, Handle::parse, is_valid_handle, no_extra)
    }),
    ("nsid", |l| run(l, Nsid::parse, is_valid_nsid, nsid_extra)),
    ("recordkey", |l| {
        run(l, RecordKey::parse, is_valid_record_key, no_extra)
    }),
    ("tid", |l| run(l, Tid::parse, is_valid_tid, tid_extra)),
    ("aturi", |l| {
        run(l, AtUri::parse, is_valid_at_uri, aturi_extra)
    }),
    ("cid", |l| run(l, CidString::parse, is_valid_cid, no_extra)),
];

#[test]
fn interop_syntax_fixtures() {
    let Some(root) = crate::fixtures() else {
        return;
    };
    let dir = root.join("interop").join("syntax");
    let mut failures = Vec::new();
    let mut total = 0usize;
    for &(kind, check) in KINDS {
        for (suffix, expect_valid) in [("valid", true), ("invalid", false)] {
            let name = format!("{kind}_syntax_{suffix}.txt");
            let path: &Path = &dir.join(&name);
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("{name}: absent, skipped");
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{name}: cannot read: {e}"));
                    continue;
                }
            };
            let lines = data_lines(&text);
            let mut bad = 0usize;
            for (lineno, line) in &lines {
                let outcome = match check(line) {
                    Ok(accepted) if accepted == expect_valid => continue,
                    Ok(true) => "accepted, expected rejection".to_owned(),
                    Ok(false) => "rejected, expected acceptance".to_owned(),
                    Err(msg) => msg,
                };
                bad += 1;
                failures.push(format!("{name}:{lineno}: {}: {outcome}", short(line)));
            }
            total += lines.len();
            println!("{name}: {} lines checked, {bad} failed", lines.len());
        }
    }
    assert!(
        total > 0,
        "fixture dir {} holds no syntax fixture lines",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} fixture failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
