//! Fuzz targets for every parser that reads what a client or a node sends, and a small
//! mutation fuzzer that runs them on the stable toolchain (no cargo-fuzz, no nightly):
//!
//! - `startup`: one packet of the connection start (length, SSL/GSS/cancel/startup codes, the
//!   startup parameters);
//! - `negotiation`: a stream of such packets, split the way the handshake reads it, through the
//!   handshake's own order rules (TLS once, GSS refused once, then startup or cancel);
//! - `scram_from_client`: the SASLInitialResponse and SASLResponse of a client, against a real
//!   verifier, with and without channel binding;
//! - `scram_from_node`: a node's AuthenticationSASL offer, server-first and server-final;
//! - `framing`: the relay's message framing, fed in arbitrary chunks, must end where it ends fed
//!   whole.
//!
//! Targets panic on a broken invariant; [`run`] reports the inputs tried and the slowest one.
//! The test suite runs a short campaign (`fuzz::tests`); `cargo run --release -p pgwarden-proxy
//! --example fuzz -- N` runs N inputs per target and prints peak memory.

use std::time::{Duration, Instant};

use crate::passthrough::Frames;
use crate::protocol::{self, Request};
use crate::scram::{self, Binding, ClientExchange, ClientKey, Keys, ServerExchange};

/// A named target and the inputs its campaign starts from.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: [Target; 5] = [
    Target { name: "startup", run: startup, seeds: startup_seeds },
    Target { name: "negotiation", run: negotiation, seeds: negotiation_seeds },
    Target { name: "scram_from_client", run: scram_from_client, seeds: scram_client_seeds },
    Target { name: "scram_from_node", run: scram_from_node, seeds: scram_node_seeds },
    Target { name: "framing", run: framing, seeds: framing_seeds },
];

/// What a campaign did.
#[derive(Debug)]
pub struct Campaign {
    pub inputs: u64,
    pub slowest: Duration,
    pub longest_input: usize,
}

/// Runs `target` on `inputs` mutated inputs (deterministic for a `seed`). A panic in the target
/// propagates: the caller sees which input by the seed and count printed before.
pub fn run(target: &Target, inputs: u64, seed: u64) -> Campaign {
    let mut rng = Rng(seed | 1);
    let corpus = (target.seeds)();
    let mut campaign = Campaign { inputs: 0, slowest: Duration::ZERO, longest_input: 0 };
    let mut input = Vec::new();
    for _ in 0..inputs {
        input.clear();
        input.extend_from_slice(&corpus[rng.below(corpus.len())]);
        let other = &corpus[rng.below(corpus.len())];
        for _ in 0..1 + rng.below(4) {
            mutate(&mut input, other, &mut rng);
        }
        let started = Instant::now();
        (target.run)(&input);
        campaign.slowest = campaign.slowest.max(started.elapsed());
        campaign.longest_input = campaign.longest_input.max(input.len());
        campaign.inputs += 1;
    }
    campaign
}

/// xorshift64*: small, fast, and the same sequence for the same seed on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Inputs never grow past this (the proxy's own limits are far below).
const MAX_INPUT: usize = 4096;

fn mutate(input: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    const INTERESTING: [i32; 10] = [0, 1, 4, 5, 8, 16, -1, i32::MAX, i32::MIN, 0x7fff];
    let len = input.len();
    match rng.below(9) {
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = [0, 0xff, 0x7f, 0x80, b',', b'=', 0x01][rng.below(7)];
        }
        2 if len < MAX_INPUT => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below(len - at);
            input.drain(at..at + n);
        }
        4 if len > 0 && len < MAX_INPUT => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            let copy = input[at..at + n].to_vec();
            let to = rng.below(len + 1);
            input.splice(to..to, copy);
        }
        5 if len >= 4 => {
            // A length field (big-endian i32) somewhere set to an edge value.
            let at = rng.below(len - 3);
            let value = INTERESTING[rng.below(INTERESTING.len())];
            input[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        6 if !other.is_empty() => {
            // Splice: our head, the other input's tail.
            let cut = rng.below(len + 1);
            let from = rng.below(other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
            input.truncate(MAX_INPUT);
        }
        7 if len > 0 => input.truncate(rng.below(len)),
        _ => {
            let at = rng.below(len + 1);
            input.insert(at, b"np=,ry0\0"[rng.below(8)]);
        }
    }
}

/// Splits `data` into length-prefixed packets the way the handshake reads them: a 4-byte
/// length checked against `max` before anything is taken.
fn packets(mut data: &[u8], max: usize) -> impl Iterator<Item = Result<&[u8], ()>> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = i32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
        if len < 8 || len as usize > max {
            data = &[];
            return Some(Err(()));
        }
        let len = len as usize;
        let packet = &data[..len.min(data.len())];
        data = &data[packet.len()..];
        (packet.len() == len).then_some(Ok(packet))
    })
}

pub fn startup(data: &[u8]) {
    if let Ok(Request::Startup(params)) = protocol::classify(data) {
        assert!(!params.user.is_empty() && !params.database.is_empty());
    }
}

/// The handshake's order rules, as `handshake::accept` applies them (TLS itself aside).
pub fn negotiation(data: &[u8]) {
    let (mut tls, mut gss_refused) = (false, false);
    for packet in packets(data, 10_000) {
        let Ok(packet) = packet else { return };
        match protocol::classify(packet) {
            Ok(Request::Ssl) if !tls => tls = true,
            Ok(Request::GssEnc) if !gss_refused && !tls => gss_refused = true,
            Ok(Request::Cancel(..) | Request::Startup(_)) | Err(_) => return,
            Ok(_) => return,
        }
    }
}

fn verifier_keys() -> Keys {
    // "pencil" with PostgreSQL's default 4096 iterations (RFC 7677's example password).
    Keys::parse("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=")
        .expect("valid verifier")
}

/// A client's SASLInitialResponse then SASLResponse bodies, separated at the first 0xff byte.
pub fn scram_from_client(data: &[u8]) {
    let keys = verifier_keys();
    let cut = data.iter().position(|b| *b == 0xff).unwrap_or(data.len());
    let (initial, last) = (&data[..cut], data.get(cut + 1..).unwrap_or_default());
    let Some((mechanism, first)) = protocol::parse_sasl_initial_response(initial) else { return };
    let hash = [7u8; 32];
    for binding in [Binding::None, Binding::Tls(&hash)] {
        if let Ok(exchange) = ServerExchange::start(mechanism, first, &keys, binding, "srvnonce") {
            assert!(exchange.server_first().starts_with("r="));
            let _ = exchange.finish(last, &keys);
        }
    }
}

/// A node's AuthenticationSASL offer, server-first and server-final, separated by 0xff bytes.
pub fn scram_from_node(data: &[u8]) {
    let keys = verifier_keys();
    let mut parts = data.split(|b| *b == 0xff);
    let offer = parts.next().unwrap_or_default();
    let first = parts.next().unwrap_or_default();
    let last = parts.next().unwrap_or_default();
    let _ = protocol::sasl_mechanisms(offer);
    let client = ClientExchange::start(Binding::None, "proxynonce".into());
    if let Ok((_, expected)) = client.finish(first, &keys, &ClientKey::zero()) {
        let _ = scram::check_server_final(last, &expected);
    }
    let _ = scram::end_point_hash(data);
}

/// Fed whole or in the chunks the first byte chooses, framing ends at the same place.
pub fn framing(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else { return };
    let mut whole = Frames::default();
    whole.advance(stream);
    let mut chunked = Frames::default();
    for chunk in stream.chunks(1 + step as usize % 7) {
        chunked.advance(chunk);
    }
    assert_eq!(whole.to_boundary(), chunked.to_boundary());
}

fn startup_seeds() -> Vec<Vec<u8>> {
    let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
    startup.extend_from_slice(b"user\0app\0database\0app\0application_name\0psql\0\0");
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    vec![
        startup,
        protocol::ssl_request().to_vec(),
        protocol::cancel_request(42, 7).to_vec(),
        [8i32.to_be_bytes(), protocol::GSSENC_REQUEST_CODE.to_be_bytes()].concat(),
    ]
}

fn negotiation_seeds() -> Vec<Vec<u8>> {
    let seeds = startup_seeds();
    vec![
        [seeds[3].clone(), seeds[1].clone(), seeds[0].clone()].concat(),
        [seeds[1].clone(), seeds[2].clone()].concat(),
        [seeds[3].clone(), seeds[3].clone(), seeds[0].clone()].concat(),
    ]
}

fn scram_client_seeds() -> Vec<Vec<u8>> {
    let plain = protocol::sasl_initial_response(scram::MECHANISM, b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
    let plus = protocol::sasl_initial_response(
        scram::MECHANISM_PLUS,
        b"p=tls-server-end-point,,n=,r=rOprNGfwEbeRWgbNEkqO",
    );
    let last =
        b"c=biws,r=rOprNGfwEbeRWgbNEkqOsrvnonce,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    vec![[&plain[5..], &[0xff], last].concat(), [&plus[5..], &[0xff], last].concat()]
}

fn scram_node_seeds() -> Vec<Vec<u8>> {
    let offer = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
    let first = b"r=proxynonce3rfcNHYJY1ZVvWVs7j,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    let last = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    vec![[&offer[..], &[0xff], first, &[0xff], last].concat()]
}

fn framing_seeds() -> Vec<Vec<u8>> {
    let mut stream = vec![3u8];
    for (tag, body) in [(b'T', &b"\0\x01a\0"[..]), (b'D', b"\0\x01\0\0\0\x011"), (b'Z', b"I")] {
        stream.push(tag);
        stream.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
        stream.extend_from_slice(body);
    }
    vec![stream]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short campaign per target in every test run; the long one is the `fuzz` example.
    #[test]
    fn every_parser_survives_a_short_campaign() {
        for target in &TARGETS {
            let campaign = run(target, 20_000, 0x5eed);
            assert_eq!(campaign.inputs, 20_000, "{}", target.name);
        }
    }

    #[test]
    fn the_seeds_reach_the_deep_paths() {
        // The seeds are valid inputs, so mutations start from where parsing succeeds.
        assert!(matches!(protocol::classify(&startup_seeds()[0]), Ok(Request::Startup(_))));
        let seed = &scram_client_seeds()[0];
        let cut = seed.iter().position(|b| *b == 0xff).unwrap();
        let (mechanism, first) = protocol::parse_sasl_initial_response(&seed[..cut]).unwrap();
        assert!(ServerExchange::start(
            mechanism,
            first,
            &verifier_keys(),
            Binding::None,
            "srvnonce"
        )
        .is_ok());
    }
}
