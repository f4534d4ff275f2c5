use super::*;
use proptest::prelude::*;

/// A client frame as a browser sends it: masked with `mask` (the driver tests use it too).
pub(crate) fn masked(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    masked(opcode, fin, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// What the decoder handed out, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<(u16, String)>),
}

/// Feeds `bytes` in reads of `chunk` bytes: the events, and the fault if one ended it.
fn decode(limit: usize, bytes: &[u8], chunk: usize) -> (Vec<Ev>, Option<Fault>) {
    let mut d = Decoder::new(limit);
    let mut evs = Vec::new();
    let mut on = |e: Event<'_>| {
        evs.push(match e {
            Event::Text(t) => Ev::Text(t.to_owned()),
            Event::Binary(b) => Ev::Binary(b.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong => Ev::Pong,
            Event::Close(c) => Ev::Close(c.map(|(code, r)| (code, r.to_owned()))),
        })
    };
    let mut fault = None;
    for c in bytes.chunks(chunk.max(1)) {
        let mut read = c.to_vec();
        if let Err(f) = d.feed(&mut read, &mut on) {
            fault = Some(f);
            break;
        }
    }
    if fault.is_none() {
        assert_eq!(d.held(), 0, "a complete stream leaves nothing held");
    }
    (evs, fault)
}

#[test]
fn accept_key_is_the_rfc_example() {
    // RFC 6455 §1.3.
    assert_eq!(
        accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn whole_messages_in_one_read_and_split_at_every_byte() {
    let long = "x".repeat(300);
    let huge = vec![7u8; 70_000];
    let mut bytes = frame(OP_TEXT, true, b"{\"type\":\"HEARTBEAT\"}");
    bytes.extend(frame(OP_TEXT, true, long.as_bytes()));
    bytes.extend(frame(OP_BINARY, true, &huge));
    bytes.extend(frame(OP_TEXT, true, b""));
    let want = vec![
        Ev::Text("{\"type\":\"HEARTBEAT\"}".into()),
        Ev::Text(long.clone()),
        Ev::Binary(huge.clone()),
        Ev::Text(String::new()),
    ];
    for chunk in [bytes.len(), 1, 2, 3, 5, 13, 4096] {
        assert_eq!(
            decode(1 << 20, &bytes, chunk),
            (want.clone(), None),
            "{chunk}"
        );
    }
}

#[test]
fn masks_are_removed_whatever_the_key() {
    for mask in [
        [0, 0, 0, 0],
        [0xff; 4],
        [1, 2, 3, 4],
        [0x80, 0x7f, 0x00, 0xaa],
    ] {
        let bytes = masked(OP_TEXT, true, "héllo, wörld: 0123456789".as_bytes(), mask);
        for chunk in [1, 3, 7, 64] {
            let (evs, fault) = decode(1024, &bytes, chunk);
            assert_eq!(evs, vec![Ev::Text("héllo, wörld: 0123456789".into())]);
            assert_eq!(fault, None);
        }
    }
}

#[test]
fn fragments_join_with_control_frames_between_them() {
    let mut bytes = frame(OP_TEXT, false, b"{\"type\":");
    bytes.extend(frame(OP_PING, true, b"are you there"));
    bytes.extend(frame(OP_CONT, false, b"\"OFF"));
    bytes.extend(frame(OP_PONG, true, b""));
    bytes.extend(frame(OP_CONT, true, b"ER\"}"));
    bytes.extend(frame(OP_BINARY, false, &[1, 2]));
    bytes.extend(frame(OP_CONT, true, &[3]));
    let want = vec![
        Ev::Ping(b"are you there".to_vec()),
        Ev::Pong,
        Ev::Text("{\"type\":\"OFFER\"}".into()),
        Ev::Binary(vec![1, 2, 3]),
    ];
    for chunk in [bytes.len(), 1, 4, 9] {
        assert_eq!(decode(1024, &bytes, chunk), (want.clone(), None), "{chunk}");
    }
}

#[test]
fn a_character_split_over_fragments_is_valid_text() {
    let s = "é".as_bytes();
    let mut bytes = frame(OP_TEXT, false, &s[..1]);
    bytes.extend(frame(OP_CONT, true, &s[1..]));
    assert_eq!(decode(64, &bytes, 1), (vec![Ev::Text("é".into())], None));
}

#[test]
fn bad_utf8_text_is_1007() {
    let (evs, fault) = decode(64, &frame(OP_TEXT, true, &[b'a', 0xff, b'b']), 100);
    assert!(evs.is_empty());
    assert_eq!(fault, Some(Fault::BadUtf8));
    assert_eq!(Fault::BadUtf8.close().0, 1007);
    // Split over fragments too.
    let mut bytes = frame(OP_TEXT, false, &[0xe2, 0x82]);
    bytes.extend(frame(OP_CONT, true, b"x"));
    assert_eq!(decode(64, &bytes, 3).1, Some(Fault::BadUtf8));
    // Binary is not checked.
    assert_eq!(
        decode(64, &frame(OP_BINARY, true, &[0xff]), 100).0,
        vec![Ev::Binary(vec![0xff])]
    );
}

#[test]
fn over_the_limit_is_1009_at_the_header_before_any_payload() {
    // Only the header of a 2 MiB frame is sent: the fault comes without its payload.
    let big = vec![0u8; 2 << 20];
    let bytes = frame(OP_TEXT, true, &big);
    let (evs, fault) = decode(1 << 20, &bytes[..14], 14);
    assert!(evs.is_empty());
    assert_eq!(fault, Some(Fault::TooBig));
    assert_eq!(Fault::TooBig.close().0, 1009);
    // Exactly the limit passes.
    let at = vec![b'a'; 1000];
    assert_eq!(decode(1000, &frame(OP_TEXT, true, &at), 333).1, None);
    // Fragments count together.
    let mut bytes = frame(OP_TEXT, false, &at[..600]);
    bytes.extend(frame(OP_CONT, true, &at[..401]));
    let (evs, fault) = decode(1000, &bytes, 1);
    assert!(evs.is_empty());
    assert_eq!(fault, Some(Fault::TooBig));
}

#[test]
fn a_refused_message_is_read_past_and_a_close_after_it_still_found() {
    let mut bytes = frame(OP_BINARY, false, &[1; 700]);
    bytes.extend(frame(OP_PING, true, b"p"));
    bytes.extend(frame(OP_CONT, false, &[2; 700]));
    bytes.extend(frame(OP_CONT, true, &[3; 10]));
    bytes.extend(frame(OP_TEXT, true, b"after the refused one"));
    bytes.extend(frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
    for chunk in [bytes.len(), 1, 50] {
        let mut d = Decoder::new(1000);
        let mut evs = Vec::new();
        let mut faults = Vec::new();
        for c in bytes.chunks(chunk) {
            let mut read = c.to_vec();
            let r = d.feed(&mut read, &mut |e| {
                evs.push(format!("{e:?}"));
            });
            faults.extend(r.err());
        }
        assert_eq!(faults, vec![Fault::TooBig], "{chunk}");
        // The ping came before the refused fragment that broke the limit.
        assert_eq!(evs.last().unwrap(), "Close(Some((1000, \"\")))", "{chunk}");
        assert_eq!(d.held(), 0);
    }
}

#[test]
fn protocol_errors_are_1002() {
    let protocol = |bytes: &[u8]| match decode(1024, bytes, 1).1 {
        Some(Fault::Protocol(_)) => {}
        other => panic!("{other:?} for {bytes:02x?}"),
    };
    // Unmasked client frame.
    protocol(&[0x81, 0x02, b'h', b'i']);
    // Reserved bits (no extension negotiated).
    let mut f = frame(OP_TEXT, true, b"hi");
    f[0] |= 0x40;
    protocol(&f);
    // Unknown opcodes.
    protocol(&frame(0x3, true, b""));
    protocol(&frame(0xB, true, b""));
    // Control frames: fragmented, or over 125 bytes.
    protocol(&frame(OP_PING, false, b""));
    protocol(&frame(OP_PING, true, &[0; 126]));
    // Continuation without a message; a new message inside a fragmented one.
    protocol(&frame(OP_CONT, true, b"x"));
    let mut f = frame(OP_TEXT, false, b"a");
    f.extend(frame(OP_TEXT, true, b"b"));
    protocol(&f);
    // A 64-bit length with its top bit set.
    let mut f = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&[1, 2, 3, 4]);
    protocol(&f);
    // Close payloads: one byte; codes never sent on the wire.
    protocol(&frame(OP_CLOSE, true, &[3]));
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
        protocol(&frame(OP_CLOSE, true, &code.to_be_bytes()));
    }
}

#[test]
fn close_carries_code_and_reason_and_ends_the_stream() {
    let mut p = 4000u16.to_be_bytes().to_vec();
    p.extend_from_slice("bye ✓".as_bytes());
    let mut bytes = frame(OP_CLOSE, true, &p);
    // Nothing after a Close is read (§5.5.1).
    bytes.extend(frame(OP_TEXT, true, b"late"));
    bytes.extend([0xff, 0xff]);
    assert_eq!(
        decode(64, &bytes, 2),
        (vec![Ev::Close(Some((4000, "bye ✓".into())))], None)
    );
    assert_eq!(
        decode(64, &frame(OP_CLOSE, true, b""), 1),
        (vec![Ev::Close(None)], None)
    );
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.push(0xc3);
    assert_eq!(
        decode(64, &frame(OP_CLOSE, true, &p), 9).1,
        Some(Fault::BadUtf8)
    );
}

#[test]
fn an_idle_decoder_holds_nothing_and_a_split_message_only_its_size() {
    let mut d = Decoder::new(1 << 20);
    assert!(
        std::mem::size_of::<Decoder>() <= 112,
        "{}",
        std::mem::size_of::<Decoder>()
    );
    let bytes = frame(OP_TEXT, true, &vec![b'a'; 5000]);
    let mut first = bytes[..100].to_vec();
    d.feed(&mut first, &mut |_| panic!("not yet")).unwrap();
    let held = d.held();
    assert!((5000..5100).contains(&held), "{held}");
    let mut rest = bytes[100..].to_vec();
    let mut n = 0;
    d.feed(&mut rest, &mut |e| {
        assert!(matches!(e, Event::Text(t) if t.len() == 5000));
        n += 1;
    })
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(d.held(), 0, "freed once complete");
}

#[test]
fn server_frames_encode_every_length_form() {
    for (len, head) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
        let (h, n) = frame_header(OP_TEXT, len);
        assert_eq!(n, head);
        assert_eq!(h[0], 0x81);
        let got = match h[1] {
            126 => usize::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes(h[2..10].try_into().unwrap()) as usize,
            l => usize::from(l),
        };
        assert_eq!(got, len);
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    }
    let reason = "é".repeat(100);
    let (p, n) = close_payload(1008, &reason);
    assert!(n <= 125);
    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1008);
    assert!(
        std::str::from_utf8(&p[2..n]).is_ok(),
        "cut on a character boundary"
    );
}

proptest! {
    /// Any sequence of messages, fragmented anyhow and read in any split, decodes to the
    /// same messages.
    #[test]
    fn any_fragmentation_and_any_reads_give_the_messages(
        msgs in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..3000), 1usize..4, any::<[u8; 4]>()), 1..6),
        reads in prop::collection::vec(1usize..700, 1..40),
    ) {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for (payload, parts, mask) in &msgs {
            let step = payload.len().div_ceil(*parts).max(1);
            let pieces: Vec<&[u8]> = if payload.is_empty() {
                vec![&[]]
            } else {
                payload.chunks(step).collect()
            };
            for (k, piece) in pieces.iter().enumerate() {
                let op = if k == 0 { OP_BINARY } else { OP_CONT };
                bytes.extend(masked(op, k + 1 == pieces.len(), piece, *mask));
                if k == 0 && pieces.len() > 1 {
                    bytes.extend(masked(OP_PING, true, &mask[..], *mask));
                    want.push(Ev::Ping(mask.to_vec()));
                }
            }
            want.push(Ev::Binary(payload.clone()));
        }
        let mut d = Decoder::new(1 << 16);
        let mut got = Vec::new();
        let mut at = 0;
        let mut r = reads.iter().cycle();
        while at < bytes.len() {
            let n = (*r.next().unwrap()).min(bytes.len() - at);
            let mut read = bytes[at..at + n].to_vec();
            at += n;
            d.feed(&mut read, &mut |e| got.push(match e {
                Event::Binary(b) => Ev::Binary(b.to_vec()),
                Event::Ping(p) => Ev::Ping(p.to_vec()),
                other => panic!("{other:?}"),
            })).unwrap();
        }
        prop_assert_eq!(got, want);
        prop_assert_eq!(d.held(), 0);
    }
}
