//! What a pooled client's SQL does to its session, read without a parser: the session state a
//! statement leaves behind that a shared server connection cannot carry (what pins the
//! client), the `SET`/`RESET` the pool carries instead, and the startup packet's settings.

use crate::metrics::Pin;

/// A `SET` or `RESET` the proxy carries from connection to connection instead of pinning.
#[derive(Debug, PartialEq, Eq)]
pub enum Carry {
    Set(String, String),
    Reset(String),
    ResetAll,
}

/// `SET [SESSION] name {=|TO} value`, `SET TIME ZONE value`, `RESET name`, `RESET ALL`, alone in
/// a simple query.
pub fn carried(sql: &[u8]) -> Option<Carry> {
    if !starts_with_any(sql, &[b"set", b"reset"]) {
        return None; // nearly every query: told apart without allocating
    }
    let text = std::str::from_utf8(sql).ok()?.trim_end_matches('\0').trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim();
    if text.contains(';') || text.contains("--") || text.contains("/*") {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let valid = |n: &str| {
        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    if let Some(rest) = lower.strip_prefix("reset ") {
        let name = rest.trim();
        return match name {
            "all" => Some(Carry::ResetAll),
            "session authorization" | "role" => None,
            n if valid(n) => Some(Carry::Reset(n.to_owned())),
            _ => None,
        };
    }
    let rest = lower.strip_prefix("set ")?.trim_start();
    let rest = rest.strip_prefix("session ").map_or(rest, str::trim_start);
    let offset = text.len() - rest.len();
    if let Some(zone) = rest.strip_prefix("time zone ") {
        let value = text[text.len() - zone.len()..].trim();
        return (!value.is_empty()).then(|| Carry::Set("timezone".into(), value.to_owned()));
    }
    let name_end = rest.find(|c: char| c.is_whitespace() || c == '=')?;
    let name = &rest[..name_end];
    if !valid(name) || matches!(name, "local" | "transaction" | "constraints" | "role" | "session")
    {
        return None;
    }
    let after = text[offset + name_end..].trim_start();
    let value = after
        .strip_prefix('=')
        .or_else(|| after.get(..3).filter(|t| t.eq_ignore_ascii_case("to ")).map(|_| &after[3..]))?
        .trim();
    (!value.is_empty()).then(|| Carry::Set(name.to_owned(), value.to_owned()))
}

/// A SQL string literal.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The session settings a startup packet asks for (values as SQL literals), or why pooling
/// cannot honour them.
pub fn settings(pairs: &[(String, String)]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in pairs {
        match name.as_str() {
            "user" | "database" => {}
            "replication" => return Err("replication connections cannot be pooled".into()),
            "options" => {
                let mut words = value.split_whitespace();
                while let Some(word) = words.next() {
                    let setting = match word {
                        "-c" => words.next().unwrap_or_default(),
                        w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")).unwrap_or(""),
                    };
                    let Some((name, value)) = setting.split_once('=') else {
                        return Err(format!(
                            "options {value:?}: only -c name=value settings can be pooled"
                        ));
                    };
                    out.push((name.replace('-', "_").to_ascii_lowercase(), quoted(value)));
                }
            }
            _ => out.push((name.to_ascii_lowercase(), quoted(value))),
        }
    }
    if let Some((name, _)) = out
        .iter()
        .find(|(n, _)| !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    {
        return Err(format!("invalid setting name {name:?}"));
    }
    Ok(out)
}

/// `params` with the values of `settings` (SQL literals) where they name the same parameter.
pub fn overlay(
    mut params: Vec<(String, String)>,
    settings: &[(String, String)],
) -> Vec<(String, String)> {
    for (name, value) in settings {
        let raw = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .map_or_else(|| value.clone(), |v| v.replace("''", "'"));
        if let Some(slot) = params.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            slot.1 = raw;
        }
    }
    params
}

pub fn drops_statements(sql: &[u8]) -> bool {
    contains_ci(sql, b"deallocate") || contains_ci(sql, b"discard")
}

/// Whether `sql`'s first non-blank bytes are one of `words` (lower-case ASCII), in any case.
pub fn starts_with_any(sql: &[u8], words: &[&[u8]]) -> bool {
    let sql = sql.trim_ascii_start();
    words.iter().any(|w| sql.get(..w.len()).is_some_and(|s| s.eq_ignore_ascii_case(w)))
}

/// Whether `haystack` holds `needle` (lower-case ASCII), in any case, without allocating.
fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

/// The session state a statement leaves behind that a shared server connection cannot carry,
/// if any: what pins its client (a conservative look at each statement's first words, and at
/// the functions that take session-level locks or set settings).
pub fn session_state(body: &[u8]) -> Option<Pin> {
    // Most statements start with none of the words that matter and call none of the functions:
    // told apart without allocating.
    const FIRST: [&[u8]; 7] =
        [b"set", b"reset", b"listen", b"prepare", b"declare", b"create", b"load"];
    let first_word_matters = body.split(|b| *b == b';').any(|s| starts_with_any(s, &FIRST));
    let comments = contains_ci(body, b"--") || contains_ci(body, b"/*");
    let functions = contains_ci(body, b"advisory_lock") || contains_ci(body, b"set_config");
    if !first_word_matters && !comments && !functions {
        return None;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    if text.contains("pg_advisory_lock") || text.contains("pg_try_advisory_lock") {
        return Some(Pin::AdvisoryLock);
    }
    if text.contains("set_config") {
        return Some(Pin::Set);
    }
    for statement in text.split(';') {
        let words: Vec<&str> = statement
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .flat_map(str::split_whitespace)
            .take(4)
            .collect();
        let reason = match words.as_slice() {
            ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => None,
            ["set", ..] | ["reset", ..] => Some(Pin::Set),
            ["listen", ..] => Some(Pin::Listen),
            ["prepare", ..] => Some(Pin::PreparedStatement),
            ["declare", ..] if statement.contains("with hold") => Some(Pin::CursorWithHold),
            ["create", "temp" | "temporary", ..]
            | ["create", "global" | "local", "temp" | "temporary", ..] => Some(Pin::TemporaryTable),
            ["load", ..] => Some(Pin::Load),
            ["copy", ..] => None,
            _ => None,
        };
        if reason.is_some() {
            return reason;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_is_found_and_transaction_state_is_not() {
        let cases: [(&str, Option<Pin>); 12] = [
            ("SELECT 1", None),
            ("set search_path = x", Some(Pin::Set)),
            ("SET LOCAL statement_timeout = 5", None),
            ("BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
            ("LISTEN jobs", Some(Pin::Listen)),
            ("select pg_advisory_lock(1)", Some(Pin::AdvisoryLock)),
            ("select pg_advisory_xact_lock(1)", None),
            ("CREATE TEMP TABLE t(x int)", Some(Pin::TemporaryTable)),
            ("create global temporary table t(x int)", Some(Pin::TemporaryTable)),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Some(Pin::CursorWithHold)),
            ("PREPARE p AS SELECT 1", Some(Pin::PreparedStatement)),
            ("-- comment\n  reset all", Some(Pin::Set)),
        ];
        for (sql, expected) in cases {
            assert_eq!(session_state(sql.as_bytes()), expected, "{sql}");
        }
    }

    #[test]
    fn set_and_reset_alone_are_carried() {
        let set = |n: &str, v: &str| Some(Carry::Set(n.into(), v.into()));
        assert_eq!(carried(b"SET search_path = app, public"), set("search_path", "app, public"));
        assert_eq!(
            carried(b"set session statement_timeout TO '5s';"),
            set("statement_timeout", "'5s'")
        );
        assert_eq!(carried(b"SET TIME ZONE 'UTC'\0"), set("timezone", "'UTC'"));
        assert_eq!(carried(b"RESET search_path"), Some(Carry::Reset("search_path".into())));
        assert_eq!(carried(b"reset all"), Some(Carry::ResetAll));
        for pinned in [
            &b"SET LOCAL x = 1"[..],
            b"SET ROLE admin",
            b"SET SESSION AUTHORIZATION x",
            b"SET a = 1; SELECT 1",
            b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            b"SELECT 1",
            b"SET x",
        ] {
            assert_eq!(carried(pinned), None, "{}", String::from_utf8_lossy(pinned));
        }
    }

    #[test]
    fn startup_settings_are_carried_and_options_parsed() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        let got = settings(&pairs(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "psql"),
            ("options", "-c search_path=app --statement-timeout=5s"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("application_name", "'psql'"),
                ("search_path", "'app'"),
                ("statement_timeout", "'5s'")
            ])
        );
        assert!(settings(&pairs(&[("replication", "database")])).is_err());
        assert!(settings(&pairs(&[("options", "-x")])).is_err());
        assert!(settings(&pairs(&[("bad name;", "x")])).is_err());
    }
}
