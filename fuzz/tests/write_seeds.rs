//! Writes the seed corpus in `fuzz/seeds/`: one valid input of each shape every target knows, so that
//! mutation starts next to every branch. Ignored; run it after changing a wire format:
//! `cargo test -p courier-fuzz --test write_seeds -- --ignored`.

use bytes::BytesMut;
use courier_core::ids::DeviceId;
use courier_core::state::{Command, MemberState, RingParams};
use courier_core::token::{TokenKey, TokenKeyId};
use courier_device::codec::{DEFAULT_MAX_FRAME, FrameCodec};
use courier_proto::device::{self as wire, device_frame, server_frame};
use tokio_util::codec::Encoder;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = courier_fuzz::harness::seeds_dir().join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn frames<M: prost::Message>(control: u8, messages: Vec<M>) -> Vec<u8> {
    let mut codec = FrameCodec::<wire::DeviceFrame>::new(DEFAULT_MAX_FRAME);
    let mut buffer = BytesMut::new();
    for message in messages {
        codec.encode(message, &mut buffer).expect("seed frame encodes");
    }
    let mut out = vec![control];
    out.extend_from_slice(&buffer);
    out
}

#[test]
#[ignore = "writes the checked-in seed corpus"]
fn write_seeds() {
    let device = |kind| wire::DeviceFrame { kind: Some(kind) };
    write(
        "device_frame",
        "device-frames",
        &frames(
            0x03,
            vec![
                device(device_frame::Kind::Activate(wire::Activate {
                    csr_der: vec![0x30, 0x82, 0x01, 0x00],
                    enrolment_secret: "secret".into(),
                })),
                device(device_frame::Kind::Hello(wire::Hello {
                    keepalive_secs: 60,
                    client: "courier-device/1".into(),
                    held_tokens: vec![wire::HeldToken { topic: "app.one".into(), token: "00".repeat(44) }],
                })),
                device(device_frame::Kind::RegisterTopic(wire::RegisterTopic { topic: "app.one".into() })),
                device(device_frame::Kind::UnregisterTopic(wire::UnregisterTopic { topic: "app.one".into() })),
                device(device_frame::Kind::Ack(wire::Ack { apns_id: "6f2a8c1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".into() })),
                device(device_frame::Kind::Ping(wire::Ping { nonce: u64::MAX })),
                device(device_frame::Kind::Pong(wire::Pong { nonce: 1 })),
                device(device_frame::Kind::Goodbye(wire::Goodbye { reason: 3, detail: "bye".into() })),
            ],
        ),
    );
    let server = |kind| wire::ServerFrame { kind: Some(kind) };
    write(
        "device_frame",
        "server-frames",
        &frames(
            0x27,
            vec![
                server(server_frame::Kind::Welcome(wire::Welcome {
                    device_id: "00".repeat(16),
                    keepalive_secs: 60,
                    server_time_ms: 1,
                })),
                server(server_frame::Kind::TokenIssued(wire::TokenIssued {
                    topic: "app.one".into(),
                    token: "ab".into(),
                })),
                server(server_frame::Kind::Notification(wire::Notification {
                    apns_id: "6f2a8c1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
                    topic: "app.one".into(),
                    payload: br#"{"aps":{"alert":"hi"}}"#.to_vec(),
                    priority: 10,
                    expiration: 0,
                    collapse_id: "c".into(),
                    push_type: "alert".into(),
                    accepted_at_ms: 5,
                    channel_id: String::new(),
                })),
                server(server_frame::Kind::Redirect(wire::Redirect {
                    device_addr: "node-2:5223".into(),
                    server_name: "node-2.courier.internal".into(),
                })),
            ],
        ),
    );
    write("device_frame", "oversized", &[0x10, 0, 0, 1, 0, 0x0a]);

    let uuid = "6f2a8c1e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
    let token = "0".repeat(88);
    write(
        "apns_head",
        "alert",
        format!(
            "POST\n/3/device/{token}\napns-topic: app.one\napns-push-type: alert\napns-priority: 10\n\
             apns-expiration: 0\napns-collapse-id: c1\napns-id: {uuid}\nauthorization: bearer e30.e30.sig\n\n\
             {{\"aps\":{{\"alert\":\"hi\"}}}}"
        )
        .as_bytes(),
    );
    write("apns_head", "voip", format!("POST\n/3/device/{token}\napns-topic: app.one.voip\n\n{{}}").as_bytes());
    write(
        "apns_head",
        "background",
        format!("POST\n/3/device/{token}\napns-topic: app.one\napns-push-type: background\napns-priority: 5\n\n{{}}")
            .as_bytes(),
    );
    write("apns_head", "status-path", b"GET\n/v1/status/00/00\napns-topic: a\n");

    write("jwt", "claims", br#"{"iss":"TEAM123456","iat":1800000000}"#);
    write("jwt", "claims-float-iat", br#"{"iss":"TEAM123456","iat":"1799999000.5"}"#);
    write(
        "jwt",
        "header-and-claims",
        b"{\"alg\":\"ES256\",\"kid\":\"KEY1234567\",\"typ\":\"JWT\"}\0{\"iss\":\"TEAM123456\",\"iat\":1800000100}",
    );
    write(
        "jwt",
        "bearer",
        b"bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IktFWTEyMzQ1NjcifQ.eyJpc3MiOiJURUFNMTIzNDU2IiwiaWF0IjoxODAwMDAwMDAwfQ.AAAA",
    );

    let device_id = DeviceId::from_slice(&[7; 16]).expect("16 bytes");
    for (n, secret) in [(1u32, 0x11u8), (2, 0x22), (3, 0x33)] {
        let minted = TokenKey::from_secret(TokenKeyId(n), [secret; 32]).mint(device_id, "app.one");
        write("token", &format!("minted-key-{n}"), minted.as_bytes());
    }
    let mut structured = vec![2u8, 0x35];
    structured.extend_from_slice(&[7; 16]);
    structured.extend_from_slice(b"app.one.voip");
    write("token", "structured", &structured);

    let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key").public_key_pem();
    let commands = [
        (
            "put-member",
            Command::PutMember {
                id: 3,
                device_addr: "c:1".into(),
                cluster_addr: "c:2".into(),
                device_name: "node-3.courier.internal".into(),
                now_ms: 4,
            },
        ),
        ("member-state", Command::SetMemberState { id: 2, state: MemberState::Draining, now_ms: 5 }),
        ("remove-member", Command::RemoveMember { id: 2 }),
        ("set-ring", Command::SetRing { params: RingParams { vnodes: 64, replication_factor: 3 } }),
        ("rotate-key", Command::RotateTokenKey { key: TokenKey::from_secret(TokenKeyId(2), [2; 32]), now_ms: 6 }),
        ("retire-key", Command::RetireTokenKey { id: TokenKeyId(1), now_ms: 7 }),
        (
            "put-provider",
            Command::PutProviderKey {
                team_id: "TEAM2".into(),
                key_id: "K2".into(),
                public_key_pem: pem,
                topics: vec!["app.two".into(), "app.three".into()],
            },
        ),
        ("remove-provider", Command::RemoveProvider { team_id: "TEAM".into(), key_id: Some("K".into()) }),
        ("revoke", Command::RevokeDevice { device: device_id }),
        (
            "suspect-clone",
            Command::SuspectClone {
                device: device_id,
                node: 1,
                addrs: vec!["127.0.0.2".into(), "127.0.0.3".into()],
                refuse: true,
                now_ms: 8,
            },
        ),
        ("clear-clone", Command::ClearClone { device: device_id }),
    ];
    for (name, command) in commands {
        write("raft_command", &format!("{name}.json"), &serde_json::to_vec(&command).expect("JSON"));
    }
    // Byte-built sequences: members, a huge ring, key rotations, a team with many topics, revocations.
    write(
        "raft_command",
        "sequence",
        &[0, 9, 3, b'x', b':', b'1', 3, b'y', b':', b'2', 0, 0, 0, 1, 3, 0, 0, 0, 64, 0, 0, 0, 2],
    );
    write("raft_command", "huge-ring", &[3, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
    write("raft_command", "many-topics", &[6, 0, 4, b'T', b'E', b'A', b'M', 1, b'Z', 120]);
    write("raft_command", "rotations", &[4, 2, 9, 4, 3, 9, 5, 1, 5, 2, 8, 1, 8, 1, 7, 4, b'T', b'E', b'A', b'M', 0]);
}
