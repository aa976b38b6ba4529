//! Named prepared statements under transaction pooling. A client's statement lives on whichever
//! server connection it gets: each statement is prepared on a server connection once, under a
//! name derived from its text and parameter types (`pgw_<hash>`, shared by every client that
//! prepares the same statement), and each connection keeps at most [`PER_CONNECTION`] of them
//! (the least recently used is closed on the server).
//!
//! The client's messages are rewritten on their way (its names become the server's; a `Parse`
//! the connection already has is answered by the proxy; a `Bind` or `Describe` of a statement the
//! connection lacks gets the `Parse` first, whose answer the client never sees; `Close` of a
//! statement is answered by the proxy), and the server's answers are matched, in order, against
//! what the client sent, so that the client sees exactly the answers PostgreSQL would have given
//! it, in the same order, after an error too (the server skips to `Sync`, and so do the
//! proxy's own answers).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use bytes::{Buf, BytesMut};

use crate::protocol::tag::{backend, frontend};
use crate::protocol::{self, status, HEADER};

/// Statements kept prepared per server connection.
pub const PER_CONNECTION: usize = 1000;

/// What the server has prepared, by name, with when each was last used.
#[derive(Default)]
pub struct ServerStatements {
    used: HashMap<String, u64>,
    clock: u64,
}

impl ServerStatements {
    fn has(&mut self, name: &str) -> bool {
        self.clock += 1;
        match self.used.get_mut(name) {
            Some(at) => {
                *at = self.clock;
                true
            }
            None => false,
        }
    }

    /// Records `name` as prepared; returns the statement to close to stay within the bound.
    fn add(&mut self, name: &str) -> Option<String> {
        self.clock += 1;
        self.used.insert(name.to_owned(), self.clock);
        if self.used.len() <= PER_CONNECTION {
            return None;
        }
        let oldest = self.used.iter().min_by_key(|(_, at)| **at).map(|(n, _)| n.clone())?;
        self.used.remove(&oldest);
        Some(oldest)
    }

    fn forget(&mut self, name: &str) {
        self.used.remove(name);
    }

    /// Every statement is gone (`DISCARD ALL`, `DEALLOCATE ALL` on the server).
    pub fn clear(&mut self) {
        self.used.clear();
    }
}

/// What answers one message the client sent (or the proxy added).
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The server's answer, up to its last message (`end`), goes to the client when `relay`
    /// (a message the proxy added: not). `prepares`: the statement a `Parse` prepares, which
    /// the connection does not have if the answer is an error or never comes.
    Server { end: End, relay: bool, prepares: Option<String> },
    /// The proxy answers, with this message (tag only, empty body), once it is due.
    Reply(u8),
}

/// The last server message of an answer.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    /// `ParseComplete`.
    Parse,
    Bind,
    Close,
    /// `RowDescription` or `NoData` (`Describe`).
    Description,
    /// `CommandComplete`, `EmptyQueryResponse` or `PortalSuspended` (`Execute`).
    Execution,
    /// `ReadyForQuery` (`Sync`, `Query`, `FunctionCall`).
    Ready,
}

const READY: Answer = Answer::Server { end: End::Ready, relay: true, prepares: None };

fn relayed(end: End) -> Answer {
    Answer::Server { end, relay: true, prepares: None }
}

/// A client's prepared statements and the answers it is owed.
#[derive(Default)]
pub struct Statements {
    /// Client name → the server's name and the `Parse` body after the name.
    named: HashMap<String, (String, Vec<u8>)>,
    answers: VecDeque<Answer>,
    /// Extended-protocol messages since the last `Sync`.
    pub unsynced: usize,
    /// Errors the server answered with so far.
    pub errors: usize,
    /// The client's messages since the last `ReadyForQuery` it got (for a re-run after a stale
    /// plan), while they stay under [`RERUN_LIMIT`] bytes.
    sent: BytesMut,
    /// Something of the current answers reached the client.
    relayed: bool,
    /// A stale plan was met: the server's answers up to `ReadyForQuery` are dropped.
    healing: bool,
    /// ... and then the client's messages run again, once: the run loop re-prepares them.
    pub rerun_due: bool,
    healed: bool,
}

/// The most bytes of messages kept to run again after a stale plan.
const RERUN_LIMIT: usize = 64 * 1024;

/// `cached plan must not change result type` (0A000): a statement the server prepared earlier
/// reads a table whose columns changed since.
fn stale_plan(body: &[u8]) -> bool {
    use protocol::{error_field, field};
    error_field(body, field::CODE) == Some(b"0A000")
        && error_field(body, field::MESSAGE)
            .is_some_and(|m| m.ends_with(b"cached plan must not change result type"))
}

/// A message of the extended protocol the proxy could not read.
#[derive(Debug, thiserror::Error)]
#[error("invalid {0} message from the client")]
pub struct Malformed(&'static str);

/// A NUL-terminated string at the start of `b`, and the rest.
fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|c| *c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

fn server_name(body: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    format!("pgw_{:016x}", hasher.finish())
}

fn push_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((4 + len) as i32).to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

impl Statements {
    /// Whether every answer the client is owed has been given.
    pub fn settled(&self) -> bool {
        self.answers.is_empty() && self.unsynced == 0
    }

    /// How many `ReadyForQuery` the client is owed (its connection was lost; at least one when
    /// it owes anything); forgets them all.
    pub fn lost(&mut self) -> usize {
        self.sent.clear();
        (self.relayed, self.healing, self.rerun_due, self.healed) = (false, false, false, false);
        let ready = self.answers.iter().filter(|a| **a == READY).count();
        let owed = !self.answers.is_empty() || self.unsynced > 0;
        self.answers.clear();
        self.unsynced = 0;
        ready.max(usize::from(owed))
    }

    /// Forgets the client's statements (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn deallocate_all(&mut self) {
        self.named.clear();
    }

    /// Forgets one of the client's statements; false if it has no such statement.
    pub fn deallocate(&mut self, name: &str) -> bool {
        self.named.remove(name).is_some()
    }

    /// A message the proxy answers itself, up to and including `ReadyForQuery`: nothing is
    /// owed for it.
    pub fn owes_nothing(&self) -> bool {
        self.answers.is_empty()
    }

    /// Records the client's named statement of a `Parse` (whole message) without sending it
    /// anywhere: it is prepared where it is first used.
    pub fn record(&mut self, parse: &[u8]) -> Result<(), Malformed> {
        let (name, rest) = cstr(&parse[HEADER..]).ok_or(Malformed("Parse"))?;
        self.named.insert(name.to_owned(), (server_name(rest), rest.to_vec()));
        Ok(())
    }

    /// Rewrites one client message (whole, tag first) for `conn` into `to_server`, recording
    /// what answers it.
    pub fn client_message(
        &mut self,
        message: &[u8],
        conn: &mut ServerStatements,
        to_server: &mut BytesMut,
    ) -> Result<(), Malformed> {
        if self.sent.len() + message.len() <= RERUN_LIMIT {
            self.sent.extend_from_slice(message);
        } else {
            self.healed = true; // too long to keep: a stale plan reaches the client
        }
        self.forward(message, conn, to_server)
    }

    /// Takes the messages to run again after a stale plan (the connection's statements were
    /// deallocated: every named statement is prepared again on the way).
    pub fn take_rerun(&mut self, conn: &mut ServerStatements) -> BytesMut {
        self.rerun_due = false;
        conn.clear();
        std::mem::take(&mut self.sent)
    }

    fn forward(
        &mut self,
        message: &[u8],
        conn: &mut ServerStatements,
        to_server: &mut BytesMut,
    ) -> Result<(), Malformed> {
        let (tag, body) = (message[0], &message[HEADER..]);
        match tag {
            frontend::PARSE => {
                self.unsynced += 1;
                let (name, rest) = cstr(body).ok_or(Malformed("Parse"))?;
                if name.is_empty() {
                    to_server.extend_from_slice(message);
                    self.answers.push_back(relayed(End::Parse));
                    return Ok(());
                }
                let server = server_name(rest);
                self.named.insert(name.to_owned(), (server.clone(), rest.to_vec()));
                if conn.has(&server) {
                    self.answers.push_back(Answer::Reply(backend::PARSE_COMPLETE));
                } else {
                    self.prepare(conn, &server, rest, to_server, true);
                }
            }
            frontend::BIND => {
                self.unsynced += 1;
                let (portal, rest) = cstr(body).ok_or(Malformed("Bind"))?;
                let (statement, rest) = cstr(rest).ok_or(Malformed("Bind"))?;
                let server = self.ensure(statement, conn, to_server);
                push_message(
                    to_server,
                    frontend::BIND,
                    &[portal.as_bytes(), &[0], server.as_bytes(), &[0], rest],
                );
                self.answers.push_back(relayed(End::Bind));
            }
            frontend::DESCRIBE => {
                self.unsynced += 1;
                let kind = *body.first().ok_or(Malformed("Describe"))?;
                let (name, _) = cstr(&body[1..]).ok_or(Malformed("Describe"))?;
                if kind == frontend::STATEMENT {
                    let server = self.ensure(name, conn, to_server);
                    let parts = [&[frontend::STATEMENT][..], server.as_bytes(), &[0]];
                    push_message(to_server, frontend::DESCRIBE, &parts);
                } else {
                    to_server.extend_from_slice(message);
                }
                self.answers.push_back(relayed(End::Description));
            }
            frontend::CLOSE => {
                self.unsynced += 1;
                let kind = *body.first().ok_or(Malformed("Close"))?;
                let (name, _) = cstr(&body[1..]).ok_or(Malformed("Close"))?;
                if kind == frontend::STATEMENT && !name.is_empty() {
                    // The server keeps it for the next client that prepares the same statement.
                    self.named.remove(name);
                    self.answers.push_back(Answer::Reply(backend::CLOSE_COMPLETE));
                } else {
                    to_server.extend_from_slice(message);
                    self.answers.push_back(relayed(End::Close));
                }
            }
            frontend::EXECUTE => {
                self.unsynced += 1;
                to_server.extend_from_slice(message);
                self.answers.push_back(relayed(End::Execution));
            }
            frontend::SYNC => {
                self.unsynced = 0;
                to_server.extend_from_slice(message);
                self.answers.push_back(READY);
            }
            frontend::FLUSH => {
                self.unsynced += 1;
                to_server.extend_from_slice(message);
            }
            frontend::QUERY | frontend::FUNCTION_CALL => {
                to_server.extend_from_slice(message);
                self.answers.push_back(READY);
            }
            // Copy data, done, fail: answered within the running statement's answer.
            _ => to_server.extend_from_slice(message),
        }
        Ok(())
    }

    /// The server name of the client's statement `name`, prepared on `conn` first if it lacks
    /// it (`""` and unknown names go through unchanged: the server answers for them).
    fn ensure(
        &mut self,
        name: &str,
        conn: &mut ServerStatements,
        to_server: &mut BytesMut,
    ) -> String {
        let Some((server, body)) = self.named.get(name) else { return name.to_owned() };
        if conn.has(server) {
            return server.clone();
        }
        let (server, body) = (server.clone(), body.clone());
        self.prepare(conn, &server, &body, to_server, false);
        server
    }

    /// Sends `Parse` of `server` (with `body`); its answer is the client's when `relay`.
    fn prepare(
        &mut self,
        conn: &mut ServerStatements,
        server: &str,
        body: &[u8],
        to_server: &mut BytesMut,
        relay: bool,
    ) {
        if let Some(evicted) = conn.add(server) {
            let parts = [&[frontend::STATEMENT][..], evicted.as_bytes(), &[0]];
            push_message(to_server, frontend::CLOSE, &parts);
            self.answers.push_back(Answer::Server {
                end: End::Close,
                relay: false,
                prepares: None,
            });
        }
        push_message(to_server, frontend::PARSE, &[server.as_bytes(), &[0], body]);
        let prepares = Some(server.to_owned());
        self.answers.push_back(Answer::Server { end: End::Parse, relay, prepares });
    }

    /// Whether the kept messages are one extended-protocol batch ending with its `Sync`.
    fn one_sync(&self) -> bool {
        let mut rest = &self.sent[..];
        let (mut syncs, mut last) = (0, 0u8);
        while let Some((tag, len)) = protocol::header(rest) {
            if frontend::answered_by_ready(tag) {
                syncs += 1;
            }
            last = tag;
            rest = rest.get(1 + len.max(0) as usize..).unwrap_or_default();
        }
        syncs == 1 && last == frontend::SYNC
    }

    /// The proxy's own answers now due (at the front), into `out`.
    pub fn replies(&mut self, out: &mut BytesMut) {
        while let Some(Answer::Reply(tag)) = self.answers.front() {
            push_message(out, *tag, &[]);
            self.answers.pop_front();
        }
    }

    /// Moves the server's messages in `sbuf` to `out` as the client is owed them, following
    /// `relaying` (bytes of a long message still to come). `status` gets each
    /// `ReadyForQuery`'s, `parameter` each `ParameterStatus` body. Returns the text of a FATAL
    /// error the server sent (not relayed: the client's connection stays).
    pub fn relay(
        &mut self,
        sbuf: &mut BytesMut,
        out: &mut BytesMut,
        relaying: &mut usize,
        status: &mut u8,
        conn: &mut ServerStatements,
        mut parameter: impl FnMut(&[u8]),
    ) -> Option<String> {
        let mut fatal = None;
        loop {
            self.replies(out);
            if *relaying > 0 {
                let n = (*relaying).min(sbuf.len());
                if n == 0 {
                    return fatal;
                }
                out.extend_from_slice(&sbuf[..n]);
                sbuf.advance(n);
                *relaying -= n;
                continue;
            }
            let Some((tag, len)) = protocol::header(sbuf) else { return fatal };
            let len = len.max(4) as usize;
            if matches!(tag, backend::DATA_ROW | backend::COPY_DATA) {
                // Rows and copy data can be long: they stream through (always the client's).
                self.relayed = true;
                out.extend_from_slice(&sbuf[..HEADER]);
                sbuf.advance(HEADER);
                *relaying = len - 4;
                continue;
            }
            if sbuf.len() < 1 + len {
                return fatal;
            }
            let message = sbuf.split_to(1 + len);
            match tag {
                // Whenever they come.
                backend::NOTICE_RESPONSE | backend::NOTIFICATION_RESPONSE => {
                    out.extend_from_slice(&message)
                }
                backend::PARAMETER_STATUS => {
                    parameter(&message[HEADER..]);
                    out.extend_from_slice(&message);
                }
                backend::ERROR_RESPONSE if protocol::is_fatal(&message[HEADER..]) => {
                    let text = protocol::error_field(&message[HEADER..], protocol::field::MESSAGE);
                    fatal = Some(String::from_utf8_lossy(text.unwrap_or(b"error")).into_owned());
                }
                backend::ERROR_RESPONSE
                    if !self.relayed
                        && !self.healed
                        && self.one_sync()
                        && stale_plan(&message[HEADER..]) =>
                {
                    // Nothing reached the client yet: its messages run again on statements
                    // prepared anew, and it never sees the error.
                    self.healing = true;
                    self.healed = true;
                    self.failed(conn);
                }
                backend::ERROR_RESPONSE => {
                    out.extend_from_slice(&message);
                    self.relayed = true;
                    self.errors += 1;
                    self.failed(conn);
                }
                backend::READY_FOR_QUERY => {
                    *status = message.get(HEADER).copied().unwrap_or(status::IDLE);
                    while let Some(answer) = self.answers.pop_front() {
                        if answer == READY {
                            break;
                        }
                    }
                    if self.healing {
                        self.healing = false;
                        self.rerun_due = true;
                        continue;
                    }
                    out.extend_from_slice(&message);
                    self.sent.clear();
                    self.relayed = false;
                    self.healed = false;
                }
                _ => {
                    let end = match tag {
                        backend::PARSE_COMPLETE => Some(End::Parse),
                        backend::BIND_COMPLETE => Some(End::Bind),
                        backend::CLOSE_COMPLETE => Some(End::Close),
                        backend::ROW_DESCRIPTION | backend::NO_DATA => Some(End::Description),
                        backend::COMMAND_COMPLETE
                        | backend::EMPTY_QUERY_RESPONSE
                        | backend::PORTAL_SUSPENDED => Some(End::Execution),
                        _ => None, // ParameterDescription, copy responses, function results
                    };
                    let (relay, finished) = match self.answers.front() {
                        // In a simple query everything up to ReadyForQuery is the query's.
                        Some(a) if *a == READY => (true, false),
                        Some(Answer::Server { end: e, relay, .. }) => (*relay, Some(*e) == end),
                        _ => (true, false),
                    };
                    if finished {
                        self.answers.pop_front();
                    }
                    if relay && !self.healing {
                        out.extend_from_slice(&message);
                        self.relayed = true;
                    }
                }
            }
        }
    }

    /// An error answered the front message. In a simple query it is part of the query's
    /// answer; in the extended protocol the server skips everything up to `Sync`, and so does
    /// the proxy (its own answers too), and the statements those skipped `Parse`s were to
    /// prepare are not on the connection.
    fn failed(&mut self, conn: &mut ServerStatements) {
        while let Some(front) = self.answers.front() {
            if *front == READY {
                break;
            }
            if let Some(Answer::Server { prepares: Some(name), .. }) = self.answers.pop_front() {
                conn.forget(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, parts: &[&[u8]]) -> BytesMut {
        let mut out = BytesMut::new();
        push_message(&mut out, tag, parts);
        out
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len = i32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
            out.push(rest[0]);
            rest = &rest[1 + len..];
        }
        out
    }

    /// Feeds `client` messages, then `server` answers; returns what went to the server and
    /// the tags the client got.
    fn exchange(
        st: &mut Statements,
        conn: &mut ServerStatements,
        client: &[BytesMut],
        server: &[BytesMut],
    ) -> (BytesMut, Vec<u8>) {
        let mut to_server = BytesMut::new();
        for m in client {
            st.client_message(m, conn, &mut to_server).unwrap();
        }
        let mut out = BytesMut::new();
        st.replies(&mut out);
        let mut sbuf = BytesMut::new();
        for m in server {
            sbuf.extend_from_slice(m);
        }
        let (mut relaying, mut status) = (0, b'I');
        st.relay(&mut sbuf, &mut out, &mut relaying, &mut status, conn, |_| {});
        (to_server, tags(&out))
    }

    #[test]
    fn a_statement_is_prepared_once_per_connection_and_answered_in_order() {
        let mut st = Statements::default();
        let mut conn = ServerStatements::default();
        let parse = msg(b'P', &[b"s1\0", b"SELECT $1\0", &[0, 0]]);
        let bind = msg(b'B', &[b"\0s1\0", &[0, 0, 0, 0, 0, 0]]);
        let exec = msg(b'E', &[b"\0", &[0, 0, 0, 0]]);
        let sync = msg(b'S', &[]);
        let answers =
            [msg(b'1', &[]), msg(b'2', &[]), msg(b'C', &[b"SELECT 1\0"]), msg(b'Z', &[b"I"])];
        let (sent, got) = exchange(
            &mut st,
            &mut conn,
            &[parse.clone(), bind.clone(), exec.clone(), sync.clone()],
            &answers,
        );
        assert_eq!(tags(&sent), b"PBES");
        assert!(String::from_utf8_lossy(&sent).contains("pgw_"), "renamed");
        assert_eq!(got, b"12CZ");
        // Again on the same connection: the Parse is answered by the proxy.
        let answers = [msg(b'2', &[]), msg(b'C', &[b"SELECT 1\0"]), msg(b'Z', &[b"I"])];
        let (sent, got) = exchange(
            &mut st,
            &mut conn,
            &[parse, bind.clone(), exec.clone(), sync.clone()],
            &answers,
        );
        assert_eq!(tags(&sent), b"BES");
        assert_eq!(got, b"12CZ");
        // On a new connection, a Bind alone brings its Parse, whose answer the client never sees.
        let mut fresh = ServerStatements::default();
        let answers =
            [msg(b'1', &[]), msg(b'2', &[]), msg(b'C', &[b"SELECT 1\0"]), msg(b'Z', &[b"I"])];
        let (sent, got) = exchange(&mut st, &mut fresh, &[bind, exec, sync], &answers);
        assert_eq!(tags(&sent), b"PBES");
        assert_eq!(got, b"2CZ");
        assert!(st.settled());
    }

    #[test]
    fn a_connection_keeps_at_most_its_bound_and_closes_the_least_recently_used() {
        let mut conn = ServerStatements::default();
        for i in 0..PER_CONNECTION {
            assert_eq!(conn.add(&format!("s{i}")), None);
        }
        assert!(conn.has("s0"), "s0 used again: s1 is now the least recently used");
        assert_eq!(conn.add("new").as_deref(), Some("s1"));
        assert!(!conn.has("s1") && conn.has("s0") && conn.has("new"));
        assert_eq!(conn.used.len(), PER_CONNECTION);
    }

    #[test]
    fn after_an_error_the_proxy_skips_its_own_answers_up_to_sync() {
        let mut st = Statements::default();
        let mut conn = ServerStatements::default();
        let parse_bad = msg(b'P', &[b"bad\0", b"SELEC\0", &[0, 0]]);
        let parse_ok = msg(b'P', &[b"ok\0", b"SELECT 1\0", &[0, 0]]);
        let close = msg(b'C', &[b"Sok\0"]);
        let sync = msg(b'S', &[]);
        let answers = [msg(b'E', &[b"SERROR\0C42601\0Msyntax\0\0"]), msg(b'Z', &[b"I"])];
        let (_, got) = exchange(&mut st, &mut conn, &[parse_bad, parse_ok, close, sync], &answers);
        assert_eq!(got, b"EZ", "no ParseComplete or CloseComplete after the error");
        assert!(conn.used.is_empty(), "neither statement is on the connection");
        assert!(st.settled());
    }
}
