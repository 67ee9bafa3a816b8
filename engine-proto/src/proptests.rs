//! Property tests across modules: arbitrary requests and replies survive encode → frame decode
//! → body decode unchanged, and arbitrary bytes never make the decoders panic.

use bytes::{Bytes, BytesMut};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;

use crate::frame::{decode_frame, FrameLimits};
use crate::reply::{encode_reply, DataRun, EpochRun, FetchReply, Reply, ReplyResult, SingleValue, TargetInfo, ERROR_MESSAGE_MAX};
use crate::request::*;
use crate::status::{RpcStatus, TargetHealth};
use crate::types::{ContainerId, ObjectId, KEY_MAX};

fn key() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 1..=KEY_MAX).prop_map(Bytes::from)
}

fn any_key() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=KEY_MAX).prop_map(Bytes::from)
}

fn data(max: usize) -> impl Strategy<Value = Bytes> {
    // Mostly small, sometimes spanning several checksum chunks.
    prop_oneof![vec(any::<u8>(), 0..64), (0..max).prop_map(|n| vec![0x5a; n])].prop_map(Bytes::from)
}

fn update_value() -> impl Strategy<Value = UpdateValue> {
    prop_oneof![
        (0..u64::MAX / 2, data(20_000).prop_filter("array data is not empty", |d| !d.is_empty()))
            .prop_map(|(o, d)| UpdateValue::array(o, d)),
        (data(5000), any::<u64>()).prop_map(|(data, csum)| UpdateValue::Single { data, csum }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let ids = (any::<u128>(), any::<u128>(), any::<u64>());
    prop_oneof![
        Just(Request::Ping),
        Just(Request::QueryTarget),
        (ids, key(), key(), update_value()).prop_map(|((c, o, epoch), dkey, akey, value)| Request::Update(Update {
            cont: ContainerId(c),
            obj: ObjectId(o),
            epoch,
            dkey,
            akey,
            value
        })),
        (ids, key(), key(), prop_oneof![Just(None), (0..u64::MAX / 2, 1..=u32::MAX).prop_map(Some)]).prop_map(
            |((c, o, epoch), dkey, akey, arr)| Request::Fetch(Fetch {
                cont: ContainerId(c),
                obj: ObjectId(o),
                epoch,
                dkey,
                akey,
                what: arr.map_or(FetchValue::Single, |(offset, len)| FetchValue::Array { offset, len }),
            })
        ),
        (ids, key(), (0..u64::MAX / 2, 1..=u32::MAX), btree_set(key(), 0..=FETCH_ALSO_MAX), any::<bool>()).prop_map(
            |((c, o, epoch), dkey, (offset, len), also, epochs_only)| {
                // The fetch's own akey is one not in `also`.
                let akey = Bytes::from_static(b"\xffmain");
                let also = also.into_iter().filter(|k| *k != akey).collect();
                Request::Fetch(Fetch {
                    cont: ContainerId(c),
                    obj: ObjectId(o),
                    epoch,
                    dkey,
                    akey: akey.clone(),
                    what: if epochs_only { FetchValue::Epochs { offset, len, also } } else { FetchValue::Versions { offset, len, also } },
                })
            }
        ),
        (
            ids,
            prop_oneof![
                Just(PunchTarget::Object),
                key().prop_map(PunchTarget::Dkey),
                (key(), key()).prop_map(|(dkey, akey)| PunchTarget::Akey { dkey, akey }),
                (key(), key(), 0..u64::MAX / 2, 1..u64::MAX / 2).prop_map(|(dkey, akey, offset, len)| PunchTarget::Range {
                    dkey,
                    akey,
                    offset,
                    len
                }),
            ]
        )
            .prop_map(|((c, o, epoch), what)| Request::Punch(Punch { cont: ContainerId(c), obj: ObjectId(o), epoch, what })),
        (
            any::<u128>(),
            any::<u64>(),
            prop_oneof![
                (any::<u128>(), proptest::option::of(any::<u128>()))
                    .prop_map(|(_, a)| (EnumTarget::Objects, a.map(|a| ObjectId(a).to_key()))),
                (any::<u128>(), proptest::option::of(any_key())).prop_map(|(o, a)| (EnumTarget::Dkeys(ObjectId(o)), a)),
                (any::<u128>(), key(), proptest::option::of(any_key())).prop_map(|(o, d, a)| (EnumTarget::Akeys(ObjectId(o), d), a)),
                (any::<u128>(), any::<u64>(), proptest::option::of(any_key()))
                    .prop_map(|(o, since, a)| (EnumTarget::DkeysSince(ObjectId(o), since), a)),
            ],
            1..=ENUM_MAX_KEYS
        )
            .prop_map(|(c, epoch, (what, anchor), max)| Request::Enumerate(Enumerate {
                cont: ContainerId(c),
                epoch,
                what,
                anchor,
                max
            })),
        (any::<u128>(), any::<u64>(), btree_set(any::<u64>(), 0..50)).prop_map(|(c, aggregate_below, r)| Request::SetRetention(
            SetRetention { cont: ContainerId(c), aggregate_below, retained: r.into_iter().collect() }
        )),
        (any::<u128>(), any::<u128>(), 0..u64::MAX, any::<u64>(), proptest::option::of(key())).prop_map(|(c, o, above, span, dkey)| {
            let below = above.saturating_add(span.max(1));
            Request::Discard(Discard { cont: ContainerId(c), obj: ObjectId(o), above, below, dkey })
        }),
    ]
}

fn holes(len: usize) -> impl Strategy<Value = Vec<(u32, u32)>> {
    // Sorted cut points inside the data, paired up into disjoint non-empty holes.
    btree_set(0..=len as u32, 0..8).prop_map(|cuts| {
        let c: Vec<u32> = cuts.into_iter().collect();
        c.chunks_exact(2).map(|w| (w[0], w[1] - w[0])).collect()
    })
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u32>(), any::<u16>(), any::<u32>()).prop_map(|(rank, targets, map_version)| Reply::Pong { rank, targets, map_version }),
        Just(Reply::Updated),
        Just(Reply::Punched),
        Just(Reply::RetentionSet),
        any::<u64>().prop_map(|versions| Reply::Discarded { versions }),
        (btree_set(0..1_000_000u32, 0..40), any::<u64>(), any::<bool>()).prop_map(|(cuts, e, p)| {
            // Disjoint runs between sorted cut points.
            let c: Vec<u32> = cuts.into_iter().collect();
            let runs = c
                .chunks_exact(2)
                .enumerate()
                .map(|(i, w)| EpochRun { offset: w[0], len: w[1] - w[0], epoch: e.wrapping_add(i as u64), punched: p ^ (i % 2 == 0) })
                .collect();
            Reply::Fetched(FetchReply::Epochs { runs })
        }),
        data(20_000).prop_flat_map(|d| holes(d.len()).prop_map(move |h| Reply::Fetched(FetchReply::array(d.clone(), h)))),
        (data(20_000), any::<u64>()).prop_flat_map(|(d, e)| holes(d.len()).prop_map(move |h| {
            // Runs: the gaps between holes, each with its own epoch.
            let mut runs = Vec::new();
            let mut at = 0u32;
            for (i, &(off, len)) in h.iter().chain(std::iter::once(&(d.len() as u32, 0))).enumerate() {
                if off > at {
                    runs.push(DataRun { offset: at, len: off - at, epoch: e.wrapping_add(i as u64) });
                }
                at = off + len;
            }
            let FetchReply::Array { data, holes, csums, .. } = FetchReply::array(d.clone(), h) else { unreachable!() };
            Reply::Fetched(FetchReply::Array { data, holes, csums, runs })
        })),
        proptest::option::of((data(5000), any::<u64>(), any::<u64>()))
            .prop_map(|v| Reply::Fetched(FetchReply::Single { value: v.map(|(data, csum, epoch)| SingleValue { data, csum, epoch }) })),
        (vec(any_key(), 0..40), proptest::option::of(any_key())).prop_map(|(keys, next)| Reply::Enumerated { keys, next }),
        (any::<[u64; 5]>(), any::<u8>()).prop_map(|([capacity, used, objects, wal_seq, checkpoint_seq], s)| Reply::TargetInfo(
            TargetInfo { capacity, used, state: TargetHealth::from_code(s), objects, wal_seq, checkpoint_seq }
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip(req in request(), id in any::<u64>(), mv in any::<u32>(), t in any::<u16>()) {
        let e = encode_request(id, mv, t, &req);
        let mut b = e.to_bytes();
        let f = decode_frame(&mut b, &FrameLimits::default()).unwrap().unwrap();
        prop_assert!(b.is_empty());
        prop_assert_eq!((f.header.request_id, f.header.map_version, f.header.target), (id, mv, t));
        prop_assert_eq!(Request::decode(&f), Ok(req));
    }

    #[test]
    fn replies_round_trip(r in reply(), id in any::<u64>(), mv in any::<u32>(), t in any::<u16>()) {
        let e = encode_reply(id, r.opcode(), mv, t, &Ok(r.clone()));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        prop_assert_eq!(f.header.request_id, id);
        prop_assert_eq!(Reply::decode(r.opcode(), &f), Ok(Ok(r)));
    }

    #[test]
    fn error_replies_round_trip(op in any::<u8>(), code in 1..u32::MAX, msg in "\\PC{0,300}") {
        let op = crate::frame::Opcode::from_code(op);
        let r: ReplyResult = Err((RpcStatus::from_code(code), msg));
        let e = encode_reply(1, op, 0, 0, &r);
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        let got = Reply::decode(op, &f).unwrap();
        prop_assert!(matches!(&got, Err((_, m)) if m.len() <= ERROR_MESSAGE_MAX));
        prop_assert_eq!(got, r);
    }

    #[test]
    fn arbitrary_frames_decode_without_panicking(bytes in vec(any::<u8>(), 0..400), op in any::<u8>(), reply in any::<bool>(),
                                                  body in vec(any::<u8>(), 0..300), data in vec(any::<u8>(), 0..64)) {
        // Raw bytes through the frame decoder.
        let mut b = BytesMut::from(&bytes[..]);
        let _ = decode_frame(&mut b, &FrameLimits::default());
        // Valid frames with arbitrary bodies through the body decoders; a request that decodes
        // re-encodes to the same value.
        let opcode = crate::frame::Opcode::from_code(op);
        let h = if reply {
            crate::frame::Header::reply(opcode, 1, 0, 0, RpcStatus::Ok)
        } else {
            crate::frame::Header::request(opcode, 1, 0, 0)
        };
        let e = crate::frame::encode_frame(&h, &body, Bytes::from(data));
        let f = decode_frame(&mut e.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
        if let Ok(req) = Request::decode(&f) {
            let again = encode_request(1, 0, 0, &req);
            let g = decode_frame(&mut again.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
            prop_assert_eq!(Request::decode(&g), Ok(req));
        }
        if let Ok(Ok(r)) = Reply::decode(opcode, &f) {
            let again = encode_reply(1, opcode, 0, 0, &Ok(r.clone()));
            let g = decode_frame(&mut again.to_bytes(), &FrameLimits::default()).unwrap().unwrap();
            prop_assert_eq!(Reply::decode(opcode, &g), Ok(Ok(r)));
        }
    }
}
