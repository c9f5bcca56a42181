//! Encoding, decoding and session tests, without sockets.

use super::*;
use crate::auth::{Scopes, Token};
use proptest::prelude::*;

fn id(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

fn chunk(data: &[u8]) -> StoredChunk {
    StoredChunk {
        id: ChunkId::of(data),
        codec: Codec::Raw,
        raw_len: data.len() as u32,
        bytes: bytes::Bytes::copy_from_slice(data),
    }
}

fn policy(prefix: Option<&str>, keep_last: Option<usize>, max_age: Option<u64>) -> Policy {
    Policy {
        prefix: prefix.map(str::to_string),
        keep_last,
        max_age: max_age.map(Duration::from_secs),
    }
}

fn gc_request() -> GcRequest {
    GcRequest {
        policies: vec![
            policy(Some("build/1"), None, None),
            policy(Some("main"), Some(5), None),
            policy(None, None, Some(7 * 86_400)),
            policy(Some("pr"), Some(2), Some(3600)),
        ],
        grace: Duration::from_secs(3600),
        repack_below_ppm: 500_000,
        dry_run: true,
    }
}

fn gc_report() -> GcReport {
    GcReport {
        dry_run: false,
        names_removed: vec![
            RemovedName {
                name: "build/1/x".into(),
                reason: "policy 1: drop scope build/1".into(),
            },
            RemovedName {
                name: "build/1/y".into(),
                reason: "policy 1: drop scope build/1".into(),
            },
        ],
        names_kept: 3,
        live_chunks: 4,
        packs_condemned: 5,
        packs_uncondemned: 6,
        packs_repacked: 7,
        packs_deleted: 8,
        manifests_deleted: 9,
        bytes_freed: 10,
        bytes_pending: 11,
        blocked_by_leases: 12,
        bytes_freeable_now: 13,
        leftovers_removed: u64::MAX,
    }
}

fn samples() -> Vec<Message> {
    vec![
        Message::Remove {
            names: vec!["pr/1/a".into(), "pr/1/b".into()],
            prefix: None,
        },
        Message::Remove {
            names: vec![],
            prefix: Some("ci/main/17".into()),
        },
        Message::Removed {
            names: vec!["ci/main/17/gpu".into()],
            not_listed: 3,
        },
        Message::Gc {
            request: gc_request(),
        },
        Message::Gc {
            request: GcRequest {
                policies: vec![],
                grace: Duration::ZERO,
                repack_below_ppm: 0,
                dry_run: false,
            },
        },
        Message::GcReply {
            report: gc_report(),
            names_not_listed: 17,
        },
        Message::GcReply {
            report: GcReport::default(),
            names_not_listed: 0,
        },
        Message::Hello {
            version: VERSION,
            token: "tok".into(),
        },
        Message::Welcome {
            version: VERSION,
            limits: Limits::default(),
            read: vec!["main".into(), "pr/1".into()],
            write: vec!["pr/1".into()],
        },
        Message::error(ErrorKind::Forbidden, "no"),
        Message::error(ErrorKind::Unknown(200), ""),
        Message::Missing {
            name: "pr/1/x".into(),
            ids: vec![id(1), id(2)],
        },
        Message::MissingReply { ids: vec![] },
        Message::PutChunks {
            name: "pr/1/x".into(),
            chunks: vec![chunk(b"hello"), chunk(&[7; 5000]), chunk(b"world!")],
        },
        Message::PutReply {
            received: 2,
            new: 1,
        },
        Message::Commit {
            name: "main/a".into(),
            manifest: vec![1, 2, 3],
        },
        Message::CommitReply {
            id: ManifestId([7; 32]),
        },
        Message::GetManifest {
            name: "main/a".into(),
            have: vec![ManifestId([3; 32])],
        },
        Message::ManifestDelta {
            id: ManifestId([4; 32]),
            base: ManifestId([5; 32]),
            delta: vec![1, 2],
        },
        Message::Manifest {
            id: ManifestId([9; 32]),
            bytes: vec![0; 100],
        },
        Message::GetChunks { ids: vec![id(3)] },
        Message::Chunks {
            chunks: vec![chunk(&[9; 70_000]), chunk(b"x")],
            not_found: vec![id(4)],
        },
        Message::List { prefix: "".into() },
        Message::Listing {
            entries: vec![
                ListEntry {
                    name: "main/a".into(),
                    manifest: ManifestId([1; 32]),
                    created: 1_700_000_000,
                    header: Some("{}".into()),
                },
                ListEntry {
                    name: "main/b".into(),
                    manifest: ManifestId([2; 32]),
                    created: 0,
                    header: None,
                },
            ],
        },
    ]
}

/// Every way to encode and decode `msg` agrees: one buffer or pieces,
/// copying or sharing chunks; sharing chunks really points into the frame.
fn check_encodings(msg: &Message) {
    let frame = encode(msg);
    assert_eq!(frame.len(), encoded_len(msg), "{msg:?}");
    let pieces = encode_shared(msg);
    assert_eq!(pieces.concat(), frame, "{msg:?}");
    assert_eq!(&decode(&frame[4..]).unwrap(), msg);
    let payload = Bytes::copy_from_slice(&frame[4..]);
    let shared = decode_shared(&payload).unwrap();
    assert_eq!(&shared, msg);
    if let Message::PutChunks { chunks, .. } | Message::Chunks { chunks, .. } = &shared {
        let range = payload.as_ptr_range();
        for c in chunks.iter().filter(|c| !c.bytes.is_empty()) {
            assert!(
                range.contains(&c.bytes.as_ptr()),
                "chunk {} was copied",
                c.id
            );
        }
    }
    if let Message::PutChunks { chunks, .. } | Message::Chunks { chunks, .. } = msg {
        // Large chunks travel as pieces of their own, the very same bytes.
        for c in chunks.iter().filter(|c| c.bytes.len() >= 1024) {
            assert!(
                pieces
                    .iter()
                    .any(|p| p.as_ptr() == c.bytes.as_ptr() && p.len() == c.bytes.len()),
                "chunk {} was copied into the frame",
                c.id
            );
        }
    }
}

#[test]
fn every_message_round_trips_and_reports_its_length() {
    for msg in samples() {
        check_encodings(&msg);
        let frame = encode(&msg);
        let len = frame_len(frame[..4].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, frame.len() - 4);
    }
}

#[test]
fn frame_decoder_handles_pieces_and_limits() {
    let msgs = samples();
    let mut stream = Vec::new();
    for m in &msgs {
        encode_into(m, &mut stream);
    }
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut got = Vec::new();
    for piece in stream.chunks(7) {
        dec.push(piece);
        while let Some(m) = dec.next_message().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);

    let mut dec = FrameDecoder::new(MIN_FRAME);
    dec.push(&(MIN_FRAME + 1).to_le_bytes());
    assert!(matches!(
        dec.next_message(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(frame_len([0; 4], 10), Err(ProtoError::Empty));
}

#[test]
fn malformed_payloads_are_errors() {
    assert_eq!(decode(&[]), Err(ProtoError::Empty));
    assert_eq!(decode(&[99]), Err(ProtoError::UnknownType(99)));
    // A count far larger than the bytes present.
    let mut p = vec![tag::GET_CHUNKS];
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&p), Err(ProtoError::Malformed { .. })));
    // Trailing bytes.
    let mut f = encode(&Message::List { prefix: "a".into() });
    f.push(0);
    assert!(decode(&f[4..]).is_err());
    // Unknown codec and out-of-range raw length.
    let good = encode(&Message::PutChunks {
        name: "a".into(),
        chunks: vec![chunk(b"abc")],
    });
    let codec_at = 4 + 1 + 4 + 1 + 4 + 32;
    let mut bad = good.clone();
    bad[codec_at] = 77;
    assert!(decode(&bad[4..]).is_err());
    let mut bad = good.clone();
    bad[codec_at + 1..codec_at + 5].copy_from_slice(&0u32.to_le_bytes());
    assert!(decode(&bad[4..]).is_err());
    // Text that is not UTF-8.
    let mut bad = encode(&Message::GetManifest {
        name: "ab".into(),
        have: vec![],
    });
    bad[9] = 0xff;
    assert!(decode(&bad[4..]).is_err());
}

#[test]
fn batches_respect_count_and_bytes() {
    let sizes = [10u64, 10, 10, 100, 5, 5, 1000, 1];
    let b = batches(&sizes, 3, 150);
    // every index appears once, in order
    let flat: Vec<usize> = b.iter().flat_map(|r| r.clone()).collect();
    assert_eq!(flat, (0..sizes.len()).collect::<Vec<_>>());
    for r in &b {
        assert!(r.len() <= 3);
        let bytes: u64 = sizes[r.clone()]
            .iter()
            .map(|s| s + CHUNK_OVERHEAD as u64)
            .sum();
        assert!(bytes <= 150 || r.len() == 1, "{r:?}");
    }
    assert!(batches(&[], 3, 10).is_empty());
}

fn table() -> TokenTable {
    TokenTable::new(vec![
        (
            "pr-1".into(),
            Token::new("pr1").unwrap().hash(),
            Scopes::parse(&["main", "pr/1"], &["pr/1"]).unwrap(),
        ),
        (
            "main".into(),
            Token::new("main").unwrap().hash(),
            Scopes::parse(&["*"], &["*"]).unwrap(),
        ),
        (
            "ops".into(),
            Token::new("admin").unwrap().hash(),
            Scopes::parse(&[], &[]).unwrap().with_admin(true),
        ),
    ])
}

fn hello(token: &str) -> Message {
    Message::Hello {
        version: VERSION,
        token: token.into(),
    }
}

#[test]
fn session_requires_a_known_token_first() {
    let t = table();
    let mut s = ServerSession::new(Limits::default());
    let r = s
        .on_request(Message::List { prefix: "".into() })
        .unwrap_err();
    assert_eq!((r.kind, r.fatal), (ErrorKind::Unauthenticated, true));
    for (msg, kind) in [
        (hello(""), ErrorKind::Unauthenticated),
        (hello("wrong"), ErrorKind::Unauthenticated),
        (
            Message::Hello {
                version: 99,
                token: "pr1".into(),
            },
            ErrorKind::Version,
        ),
        (Message::List { prefix: "".into() }, ErrorKind::Protocol),
    ] {
        let mut s = ServerSession::new(Limits::default());
        let r = s.on_hello(msg, &t).unwrap_err();
        assert_eq!(r.kind, kind);
        assert!(r.fatal);
        assert!(s.grant().is_none());
    }
    let mut s = ServerSession::new(Limits::default());
    let w = s.on_hello(hello("pr1"), &t).unwrap();
    let (limits, read, write) = check_welcome(w).unwrap();
    assert_eq!(limits, Limits::default());
    assert_eq!(read, ["main/*", "pr/1/*"]);
    assert_eq!(write, ["pr/1/*"]);
    assert_eq!(s.grant().unwrap().label, "pr-1");
    assert_eq!(
        s.on_hello(hello("pr1"), &t).unwrap_err().kind,
        ErrorKind::Protocol
    );
}

#[test]
fn a_reload_closes_only_sessions_whose_token_went_or_whose_scopes_changed() {
    let welcomed = |token: &str| {
        let mut s = ServerSession::new(Limits::default());
        s.on_hello(hello(token), &table()).unwrap();
        s
    };
    let list = || Message::List { prefix: "".into() };
    // The same tokens (a reload that changed something else), or another
    // token added: nothing happens
    let mut pr = welcomed("pr1");
    pr.on_tokens_changed(&table()).unwrap();
    let mut entries = vec![(
        "pr-1".to_string(),
        Token::new("pr1").unwrap().hash(),
        Scopes::parse(&["main", "pr/1"], &["pr/1"]).unwrap(),
    )];
    let without_main = TokenTable::new(entries.clone());
    entries.push((
        "new".into(),
        Token::new("new").unwrap().hash(),
        Scopes::parse(&["*"], &[]).unwrap(),
    ));
    let more = TokenTable::new(entries).limit_connections("pr-1", 2);
    // (nor does a connection limit of its own).
    pr.on_tokens_changed(&more).unwrap();
    assert!(matches!(pr.on_request(list()), Ok(Action::List { .. })));

    // Its token removed: closed, and nothing more is served.
    let mut main = welcomed("main");
    let r = main.on_tokens_changed(&without_main).unwrap_err();
    assert_eq!((r.kind, r.fatal), (ErrorKind::Unauthenticated, true));
    assert!(
        r.message
            .contains("no longer accepts this token (\"main\")"),
        "{}",
        r.message
    );
    assert!(main.is_closed());
    assert!(main.on_request(list()).is_err());
    // The PR token still there with the same scopes: kept.
    pr.on_tokens_changed(&without_main).unwrap();

    // The same token, narrower: closed, saying so.
    let narrower = TokenTable::new(vec![(
        "pr-1".into(),
        Token::new("pr1").unwrap().hash(),
        Scopes::parse(&["pr/1"], &["pr/1"]).unwrap(),
    )]);
    let r = pr.on_tokens_changed(&narrower).unwrap_err();
    assert_eq!(r.kind, ErrorKind::Unauthenticated);
    assert!(
        r.message.contains("changed what this token"),
        "{}",
        r.message
    );
    assert!(pr.is_closed());
    // A session not yet welcomed has nothing to lose.
    let mut fresh = ServerSession::new(Limits::default());
    fresh.on_tokens_changed(&narrower).unwrap();
}

/// A manifest of one-byte chunks with these ids.
fn manifest_of(ids: &[u8]) -> Manifest {
    Manifest {
        header: store::manifest::Header {
            kind: store::manifest::StashKind::Stream,
            size: ids.len() as u64,
            sha256: "00".repeat(32),
            source: None,
            image: None,
        },
        meta: vec![],
        content: ids
            .iter()
            .map(|&n| store::manifest::ChunkRef { id: id(n), len: 1 })
            .collect(),
        layout: [(store::tarsplit::Part::Content, ids.len() as u64)]
            .into_iter()
            .collect(),
    }
}

#[test]
fn one_connection_may_fetch_the_manifests_of_a_bounded_number_of_chunks() {
    let t = table();
    let mut s = ServerSession::new(Limits::default());
    s.on_hello(hello("pr1"), &t).unwrap();
    s.max_readable = 3;
    s.manifest_served(&manifest_of(&[1, 2])).unwrap();
    assert!(matches!(
        s.on_request(Message::GetChunks {
            ids: vec![id(1), id(2)]
        }),
        Ok(Action::GetChunks { .. })
    ));
    // Chunks it may already read do not count twice.
    s.manifest_served(&manifest_of(&[2, 3, 3])).unwrap();
    let r = s.manifest_served(&manifest_of(&[3, 4])).unwrap_err();
    assert_eq!((r.kind, r.fatal), (ErrorKind::Limit, false), "{r:?}");
    assert!(
        r.message
            .contains("fetched manifests of 3 chunks; 1 more would pass the 3"),
        "{}",
        r.message
    );
    // Nothing of the refused manifest became readable.
    let r = s
        .on_request(Message::GetChunks { ids: vec![id(4)] })
        .unwrap_err();
    assert_eq!(r.kind, ErrorKind::Forbidden);
    assert!(matches!(
        s.on_request(Message::GetChunks { ids: vec![id(3)] }),
        Ok(Action::GetChunks { .. })
    ));
}

#[test]
fn session_enforces_scopes() {
    let t = table();
    let mut s = ServerSession::new(Limits::default());
    s.on_hello(hello("pr1"), &t).unwrap();
    let forbidden = |r: Result<Action, Reject>| {
        let r = r.unwrap_err();
        assert_eq!((r.kind, r.fatal), (ErrorKind::Forbidden, false), "{r:?}");
        r.message
    };
    // The message names the stash as the user wrote it, and the scopes.
    assert_eq!(
        forbidden(s.on_request(Message::Commit {
            name: "main/x".into(),
            manifest: vec![],
        })),
        r#"this token may not write "main/x" (it writes pr/1/*)"#
    );
    forbidden(s.on_request(Message::Missing {
        name: "main/x".into(),
        ids: vec![id(1)],
    }));
    forbidden(s.on_request(Message::PutChunks {
        name: "pr/2/x".into(),
        chunks: vec![],
    }));
    assert_eq!(
        forbidden(s.on_request(Message::GetManifest {
            name: "pr/2/x".into(),
            have: vec![],
        })),
        r#"this token may not read "pr/2/x" (it reads main/*, pr/1/*)"#
    );
    // Chunks are readable only once a manifest naming them was served.
    forbidden(s.on_request(Message::GetChunks { ids: vec![id(1)] }));
    assert!(matches!(
        s.on_request(Message::GetManifest {
            name: "main/x".into(),
            have: vec![],
        }),
        Ok(Action::GetManifest { .. })
    ));
    assert!(matches!(
        s.on_request(Message::Commit {
            name: "pr/1/x".into(),
            manifest: vec![],
        }),
        Ok(Action::Commit { .. })
    ));
    let bad = s
        .on_request(Message::GetManifest {
            name: "../etc".into(),
            have: vec![],
        })
        .unwrap_err();
    assert_eq!(bad.kind, ErrorKind::BadName);
    assert!(s.readable("main/x") && s.readable("pr/1/y"));
    assert!(!s.readable("pr/2/y") && !s.readable("not a name"));
    // A reply is not a request.
    assert_eq!(
        s.on_request(Message::PutReply {
            received: 0,
            new: 0
        })
        .unwrap_err()
        .kind,
        ErrorKind::Protocol
    );
}

#[test]
fn a_closed_session_serves_nothing() {
    let t = table();
    let mut s = ServerSession::new(Limits::default());
    s.on_hello(hello("main"), &t).unwrap();
    assert!(s.on_request(Message::List { prefix: "".into() }).is_ok());
    s.close();
    assert!(s.is_closed() && s.grant().is_none());
    let r = s
        .on_request(Message::List { prefix: "".into() })
        .unwrap_err();
    assert!(r.fatal);
    assert!(!s.readable("main/x"));
}

#[test]
fn session_enforces_batch_limits() {
    let t = table();
    let limits = Limits {
        max_batch_ids: 2,
        ..Limits::default()
    };
    let mut s = ServerSession::new(limits);
    s.on_hello(hello("main"), &t).unwrap();
    let r = s
        .on_request(Message::Missing {
            name: "main/x".into(),
            ids: vec![id(1), id(2), id(3)],
        })
        .unwrap_err();
    assert_eq!((r.kind, r.fatal), (ErrorKind::Limit, true));
    assert!(s
        .on_request(Message::Missing {
            name: "main/x".into(),
            ids: vec![id(1), id(2)],
        })
        .is_ok());
}

#[test]
fn welcome_checks() {
    assert_eq!(
        check_welcome(Message::error(ErrorKind::Busy, "busy"))
            .unwrap_err()
            .kind,
        ErrorKind::Busy
    );
    let w = |max_frame| Message::Welcome {
        version: VERSION,
        limits: Limits {
            max_frame,
            ..Limits::default()
        },
        read: vec![],
        write: vec![],
    };
    assert!(check_welcome(w(MIN_FRAME)).is_ok());
    assert_eq!(
        check_welcome(w(1000)).unwrap_err().kind,
        ErrorKind::Protocol
    );
    for k in ErrorKind::ALL {
        assert_eq!(ErrorKind::from_code(k.code()), k);
    }
}

fn arb_chunk() -> impl Strategy<Value = StoredChunk> {
    (
        any::<[u8; 32]>(),
        prop::bool::ANY,
        1u32..MAX_CHUNK,
        // Both sides of `Pieces::SHARE_FROM`.
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 1000..1100),
        ],
    )
        .prop_map(|(id, z, raw_len, bytes)| StoredChunk {
            id: ChunkId(id),
            codec: if z { Codec::Zstd } else { Codec::Raw },
            raw_len,
            bytes: bytes.into(),
        })
}

fn arb_ids() -> impl Strategy<Value = Vec<ChunkId>> {
    prop::collection::vec(any::<[u8; 32]>().prop_map(ChunkId), 0..8)
}

fn arb_message() -> impl Strategy<Value = Message> {
    let s = || ".{0,20}";
    prop_oneof![
        (any::<u16>(), "[!-~]{0,40}")
            .prop_map(|(version, token)| Message::Hello { version, token }),
        (
            any::<u16>(),
            any::<(u32, u32, u32)>(),
            prop::collection::vec(s(), 0..4),
            prop::collection::vec(s(), 0..4)
        )
            .prop_map(|(version, (a, b, c), read, write)| Message::Welcome {
                version,
                limits: Limits {
                    max_frame: a,
                    max_batch_ids: b,
                    max_streams: c
                },
                read,
                write
            }),
        (1u8..=255, s()).prop_map(|(k, m)| Message::error(ErrorKind::from_code(k), m)),
        (s(), arb_ids()).prop_map(|(name, ids)| Message::Missing { name, ids }),
        arb_ids().prop_map(|ids| Message::MissingReply { ids }),
        (s(), prop::collection::vec(arb_chunk(), 0..4))
            .prop_map(|(name, chunks)| Message::PutChunks { name, chunks }),
        any::<(u32, u32)>().prop_map(|(received, new)| Message::PutReply { received, new }),
        (s(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(name, manifest)| Message::Commit { name, manifest }),
        any::<[u8; 32]>().prop_map(|i| Message::CommitReply { id: ManifestId(i) }),
        (
            s(),
            prop::collection::vec(any::<[u8; 32]>().prop_map(ManifestId), 0..3)
        )
            .prop_map(|(name, have)| Message::GetManifest { name, have }),
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(i, b, delta)| Message::ManifestDelta {
                id: ManifestId(i),
                base: ManifestId(b),
                delta,
            }),
        (any::<[u8; 32]>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(i, bytes)| {
            Message::Manifest {
                id: ManifestId(i),
                bytes,
            }
        }),
        arb_ids().prop_map(|ids| Message::GetChunks { ids }),
        (prop::collection::vec(arb_chunk(), 0..4), arb_ids())
            .prop_map(|(chunks, not_found)| Message::Chunks { chunks, not_found }),
        s().prop_map(|prefix| Message::List { prefix }),
        prop::collection::vec(
            (s(), any::<[u8; 32]>(), any::<u64>(), prop::option::of(s())).prop_map(
                |(name, m, created, header)| ListEntry {
                    name,
                    manifest: ManifestId(m),
                    created,
                    header,
                }
            ),
            0..4
        )
        .prop_map(|entries| Message::Listing { entries }),
        arb_gc_request().prop_map(|request| Message::Gc { request }),
        (prop::collection::vec(s(), 0..4), prop::option::of(s()))
            .prop_map(|(names, prefix)| Message::Remove { names, prefix }),
        (prop::collection::vec(s(), 0..4), any::<u64>())
            .prop_map(|(names, not_listed)| Message::Removed { names, not_listed }),
        (
            any::<bool>(),
            prop::collection::vec((s(), s()), 0..4),
            any::<u64>(),
            any::<[u64; 12]>()
        )
            .prop_map(|(dry_run, names, names_not_listed, c)| Message::GcReply {
                report: GcReport {
                    dry_run,
                    names_removed: names
                        .into_iter()
                        .map(|(name, reason)| RemovedName { name, reason })
                        .collect(),
                    names_kept: c[0],
                    live_chunks: c[1],
                    packs_condemned: c[2],
                    packs_uncondemned: c[3],
                    packs_repacked: c[4],
                    packs_deleted: c[5],
                    manifests_deleted: c[6],
                    bytes_freed: c[7],
                    bytes_pending: c[8],
                    blocked_by_leases: c[9],
                    bytes_freeable_now: c[10],
                    leftovers_removed: c[11],
                },
                names_not_listed,
            }),
    ]
}

fn arb_gc_request() -> impl Strategy<Value = GcRequest> {
    (
        prop::collection::vec(
            (
                prop::option::of(".{0,20}"),
                prop::option::of(0usize..1000),
                prop::option::of(any::<u64>()),
            )
                .prop_map(|(prefix, keep_last, max_age)| Policy {
                    prefix,
                    keep_last,
                    max_age: max_age.map(Duration::from_secs),
                }),
            0..5,
        ),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(policies, grace, repack_below_ppm, dry_run)| GcRequest {
            policies,
            grace: Duration::from_secs(grace),
            repack_below_ppm,
            dry_run,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(msg in arb_message()) {
        check_encodings(&msg);
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&bytes);
        while let Ok(Some(_)) = d.next_message() {}
    }

    #[test]
    fn decode_of_mutated_frames_never_panics(
        msg in arb_message(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut frame = encode(&msg);
        for (at, v) in flips {
            let n = frame.len();
            frame[at % n] ^= v;
        }
        let cut = cut % (frame.len() + 1);
        let _ = decode(&frame[4.min(cut)..cut]);
        let _ = decode(&frame[4..]);
    }

    #[test]
    fn session_never_panics_on_any_message(msgs in prop::collection::vec(arb_message(), 0..6)) {
        let t = table();
        let mut s = ServerSession::new(Limits::default());
        let mut first = true;
        for m in msgs {
            if first {
                let _ = s.on_hello(m, &t);
                first = false;
            } else {
                let _ = s.on_request(m);
            }
        }
    }
}

#[test]
fn gc_messages_round_trip_and_are_bounded() {
    for msg in [
        Message::Gc {
            request: gc_request(),
        },
        Message::GcReply {
            report: gc_report(),
            names_not_listed: 3,
        },
    ] {
        let frame = encode(&msg);
        assert_eq!(frame.len(), encoded_len(&msg));
        assert_eq!(decode(&frame[4..]).unwrap(), msg);
    }
    let many = |n: usize, prefix: String| Message::Gc {
        request: GcRequest {
            policies: vec![policy(Some(&prefix), None, None); n],
            grace: Duration::ZERO,
            repack_below_ppm: 0,
            dry_run: false,
        },
    };
    // Too many policies, or a prefix longer than any name: refused while
    // decoding, before anything is allocated for them.
    let f = encode(&many(MAX_GC_POLICIES, "a".into()));
    assert!(decode(&f[4..]).is_ok());
    let f = encode(&many(MAX_GC_POLICIES + 1, "a".into()));
    let e = decode(&f[4..]).unwrap_err().to_string();
    assert!(e.contains("at most 64"), "{e}");
    let f = encode(&many(1, "a".repeat(MAX_GC_PREFIX_LEN + 1)));
    assert!(decode(&f[4..]).is_err());
    // A count far beyond the bytes present.
    let mut p = vec![tag::GC];
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&p), Err(ProtoError::Malformed { .. })));
    // Unknown policy flags, a dry-run flag that is not 0 or 1, keep_last
    // out of range.
    let good = encode(&Message::Gc {
        request: GcRequest {
            policies: vec![policy(None, Some(1), None)],
            grace: Duration::ZERO,
            repack_below_ppm: 0,
            dry_run: false,
        },
    });
    let flags_at = 4 + 1 + 4;
    let mut bad = good.clone();
    bad[flags_at] = 0x80;
    assert!(decode(&bad[4..]).is_err());
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] = 2;
    assert!(decode(&bad[4..]).is_err());
    let mut bad = good.clone();
    bad[flags_at + 1..flags_at + 9].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode(&bad[4..]).is_err());
}

#[test]
fn gc_request_carries_the_options() {
    let opts = GcOptions {
        policies: gc_request().policies,
        grace: Duration::from_millis(90_500),
        repack_below: 0.25,
        dry_run: true,
        mark_slack: Duration::from_secs(1),
    };
    let r = GcRequest::from_options(&opts);
    assert_eq!(r.grace, Duration::from_secs(90));
    assert_eq!(r.repack_below_ppm, 250_000);
    let back = r.to_options();
    assert_eq!(back.policies, opts.policies);
    assert_eq!(back.grace, Duration::from_secs(90));
    assert_eq!(back.repack_below, 0.25);
    assert!(back.dry_run);
    // The slack is the server's, not the client's.
    assert_eq!(back.mark_slack, GcOptions::default().mark_slack);
}

#[test]
fn gc_needs_the_admin_scope() {
    let t = table();
    let gc = || Message::Gc {
        request: gc_request(),
    };
    for token in ["pr1", "main"] {
        let mut s = ServerSession::new(Limits::default());
        s.on_hello(hello(token), &t).unwrap();
        let r = s.on_request(gc()).unwrap_err();
        assert_eq!((r.kind, r.fatal), (ErrorKind::Forbidden, false), "{token}");
        assert!(
            r.message.contains("admin") && r.message.contains("nothing was collected"),
            "{}",
            r.message
        );
        // The session goes on serving what the token may do.
        assert!(s.on_request(Message::List { prefix: "".into() }).is_ok());
    }
    let mut s = ServerSession::new(Limits::default());
    s.on_hello(hello("admin"), &t).unwrap();
    assert_eq!(
        s.on_request(gc()),
        Ok(Action::Gc {
            request: gc_request()
        })
    );
    // An admin token is still bound by its read and write scopes elsewhere.
    assert_eq!(
        s.on_request(Message::Commit {
            name: "main/x".into(),
            manifest: vec![],
        })
        .unwrap_err()
        .kind,
        ErrorKind::Forbidden
    );
    // Out-of-bounds requests are refused, not run.
    let refused = |request: GcRequest| {
        let mut s = ServerSession::new(Limits::default());
        s.on_hello(hello("admin"), &t).unwrap();
        let r = s.on_request(Message::Gc { request }).unwrap_err();
        assert!(!r.fatal);
        assert!(r.message.contains("nothing was collected"), "{}", r.message);
        r.kind
    };
    let base = gc_request();
    assert_eq!(
        refused(GcRequest {
            policies: vec![policy(Some("../etc"), None, None)],
            ..base.clone()
        }),
        ErrorKind::BadName
    );
    assert_eq!(
        refused(GcRequest {
            policies: vec![policy(None, None, None)],
            ..base.clone()
        }),
        ErrorKind::Protocol
    );
    assert_eq!(
        refused(GcRequest {
            grace: MAX_GC_GRACE + Duration::from_secs(1),
            ..base.clone()
        }),
        ErrorKind::Limit
    );
    assert_eq!(
        refused(GcRequest {
            repack_below_ppm: PPM + 1,
            ..base.clone()
        }),
        ErrorKind::Limit
    );
    assert_eq!(
        refused(GcRequest {
            policies: vec![policy(Some("main"), None, None); MAX_GC_POLICIES + 1],
            ..base
        }),
        ErrorKind::Limit
    );
}

#[test]
fn removals_need_the_write_scope_of_every_name_or_the_whole_prefix() {
    let t = table();
    let mut s = ServerSession::new(Limits::default());
    s.on_hello(hello("pr1"), &t).unwrap();
    let names = |v: &[&str]| Message::Remove {
        names: v.iter().map(|n| n.to_string()).collect(),
        prefix: None,
    };
    let prefix = |p: &str| Message::Remove {
        names: vec![],
        prefix: Some(p.into()),
    };
    let refused = |r: Result<Action, Reject>, kind: ErrorKind| {
        let r = r.unwrap_err();
        assert_eq!((r.kind, r.fatal), (kind, false), "{r:?}");
        r.message
    };
    match s.on_request(names(&["pr/1/a", "pr/1/b"])).unwrap() {
        Action::RemoveNames { names } => assert_eq!(names.len(), 2),
        other => panic!("{other:?}"),
    }
    // One name outside the scope: nothing is removed.
    let m = refused(
        s.on_request(names(&["pr/1/a", "main/x"])),
        ErrorKind::Forbidden,
    );
    assert!(m.contains("nothing was removed"), "{m}");
    refused(s.on_request(names(&["pr/1/../x"])), ErrorKind::BadName);
    for ok in ["pr/1", "pr/1/", "pr/1/build/7"] {
        assert!(
            matches!(s.on_request(prefix(ok)), Ok(Action::RemovePrefix { .. })),
            "{ok}"
        );
    }
    // "pr" holds other pull requests' names; "" holds everything.
    for bad in ["pr", "", "main", "pr/10"] {
        refused(s.on_request(prefix(bad)), ErrorKind::Forbidden);
    }
    refused(s.on_request(prefix("../pr/1")), ErrorKind::BadName);
    refused(s.on_request(names(&[])), ErrorKind::Protocol);
    let both = Message::Remove {
        names: vec!["pr/1/a".into()],
        prefix: Some("pr/1".into()),
    };
    refused(s.on_request(both), ErrorKind::Protocol);
    // A token that writes everything may remove everything.
    let mut main = ServerSession::new(Limits::default());
    main.on_hello(hello("main"), &t).unwrap();
    assert!(matches!(
        main.on_request(prefix("")),
        Ok(Action::RemovePrefix { .. })
    ));
}
