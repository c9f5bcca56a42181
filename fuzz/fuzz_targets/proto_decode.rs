//! transfer::proto: every message decoder, the framing (`frame_len`, the
//! same check the QUIC glue in `wire.rs` does, and `FrameDecoder`), and the
//! server's session checks on what decodes.
//!
//! Mode byte: 0 = one payload for `decode`; 1 = a byte stream for
//! `FrameDecoder`, pushed in pieces; 2 = a stream of frames replayed
//! against a `ServerSession` (first a hello, then requests).
//! Properties: a decoded message re-encodes to exactly the bytes it came
//! from (in one buffer or in pieces), `encoded_len` is its frame's length,
//! decoding with shared chunks gives the same message, and decoding does
//! not depend on how the stream was cut.
#![no_main]

use ferry_fuzz::mode;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use transfer::auth::{Scopes, TokenHash, TokenTable};
use transfer::proto::{self, Action, FrameDecoder, Limits, Message, ServerSession, HEADER_LEN};

const TOKEN: &str = "fuzz-token-0123456789";

fn check_message(payload: &[u8], msg: &Message) {
    let frame = proto::encode(msg);
    assert_eq!(
        &frame[HEADER_LEN..],
        payload,
        "decode -> encode is not the identity"
    );
    assert_eq!(proto::encoded_len(msg), frame.len(), "encoded_len is wrong");
    let len = proto::frame_len(frame[..HEADER_LEN].try_into().unwrap(), u32::MAX)
        .expect("own frame header");
    assert_eq!(len, payload.len());
    assert_eq!(proto::decode(payload).as_ref(), Ok(msg));
    // What the QUIC glue uses: chunks sharing the payload, frames in pieces.
    let shared = bytes::Bytes::copy_from_slice(payload);
    assert_eq!(proto::decode_shared(&shared).as_ref(), Ok(msg));
    assert_eq!(proto::encode_shared(msg).concat(), frame, "pieces differ");
    match msg {
        Message::Gc { request } => {
            let _ = request.check();
        }
        Message::Welcome { .. } => {
            let _ = proto::check_welcome(msg.clone());
        }
        Message::PutChunks { chunks, .. } | Message::Chunks { chunks, .. } => {
            // What the receiver does with each chunk before keeping it.
            let mut buf = Vec::new();
            for c in chunks.iter().take(8) {
                if store::repo::verify_stored(c, &mut buf).is_ok() {
                    assert_eq!(buf.len(), c.raw_len as usize);
                }
            }
        }
        _ => {}
    }
}

/// Every message (or the first error) of `stream` pushed in pieces.
fn frames(stream: &[u8], pieces: &[usize], max: u32) -> Vec<Result<Message, proto::ProtoError>> {
    let mut dec = FrameDecoder::new(max);
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    loop {
        loop {
            match dec.next_message() {
                Ok(Some(m)) => out.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
        if rest.is_empty() {
            return out;
        }
        let n = if pieces.is_empty() {
            rest.len()
        } else {
            pieces[i % pieces.len()].clamp(1, rest.len())
        };
        dec.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
}

fn tokens() -> &'static (TokenTable, Scopes) {
    static T: OnceLock<(TokenTable, Scopes)> = OnceLock::new();
    T.get_or_init(|| {
        let scopes = Scopes::parse(&["pub", "team/a"], &["pub"])
            .expect("scopes")
            .with_admin(true);
        let table = TokenTable::new(vec![(
            "fuzz".to_string(),
            TokenHash::of(TOKEN),
            scopes.clone(),
        )]);
        (table, scopes)
    })
}

fn session(msgs: Vec<Message>) {
    let (table, scopes) = tokens();
    let limits = Limits {
        max_frame: proto::MIN_FRAME,
        max_batch_ids: 64,
        max_streams: 4,
    };
    let mut s = ServerSession::new(limits);
    let mut msgs = msgs.into_iter();
    let Some(hello) = msgs.next() else { return };
    match s.on_hello(hello, table) {
        Ok(welcome) => assert!(proto::check_welcome(welcome).is_ok()),
        Err(_) => {
            s.close();
            assert!(s.is_closed());
        }
    }
    for msg in msgs {
        match s.on_request(msg) {
            Ok(Action::Missing { ids }) | Ok(Action::GetChunks { ids }) => {
                assert!(ids.len() <= 64)
            }
            Ok(Action::Put { chunks }) => assert!(chunks.len() <= 64),
            Ok(Action::Commit { name, .. }) => assert!(scopes.can_write(&name)),
            Ok(Action::GetManifest { name, have }) => {
                assert!(scopes.can_read(&name));
                assert!(have.len() <= proto::MAX_HAVE);
            }
            Ok(Action::Gc { request }) => assert!(request.check().is_ok()),
            Ok(Action::List { prefix }) => {
                let _ = s.readable(&prefix);
            }
            Ok(Action::RemoveNames { names }) => {
                assert!(!names.is_empty() && names.len() <= 64);
                assert!(names.iter().all(|n| scopes.can_write(n)));
            }
            Ok(Action::RemovePrefix { prefix }) => {
                // Every name under the prefix must be writable.
                let probes = [prefix.clone(), format!("{prefix}/x"), "zz/other".into()];
                for probe in probes.iter().filter(|p| p.starts_with(&prefix)) {
                    if let Ok(n) = store::name::Name::parse(probe) {
                        assert!(scopes.can_write(&n), "{probe:?} under {prefix:?}");
                    }
                }
            }
            // Requests added later are still run through the session.
            #[allow(unreachable_patterns)]
            Ok(_) => {}
            Err(reject) => {
                let _ = reject.to_message();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((m, rest)) = mode(data) else { return };
    match m % 3 {
        0 => {
            if let Ok(msg) = proto::decode(rest) {
                check_message(rest, &msg);
            }
        }
        1 => {
            // Next byte: how many feed sizes follow (0 to 7).
            let Some((&n, rest)) = rest.split_first() else {
                return;
            };
            let n = (n as usize % 8).min(rest.len());
            let (sizes, stream) = rest.split_at(n);
            let pieces: Vec<usize> = sizes.iter().map(|&b| b as usize + 1).collect();
            let max = 1 << 16;
            let whole = frames(stream, &[], max);
            assert_eq!(
                frames(stream, &pieces, max),
                whole,
                "framing depends on the cut"
            );
            // Messages decoded from the stream are its frames, in order.
            let mut at = 0;
            for r in &whole {
                let Ok(msg) = r else { break };
                let frame = proto::encode(msg);
                assert_eq!(&stream[at..at + frame.len()], &frame[..]);
                at += frame.len();
            }
        }
        _ => {
            let msgs: Vec<Message> = frames(rest, &[], 1 << 20)
                .into_iter()
                .map_while(Result::ok)
                .take(64)
                .collect();
            session(msgs);
        }
    }
});
