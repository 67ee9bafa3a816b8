//! The reservation rules, host against host, for every type.

use super::*;
use proptest::prelude::*;

const A: HostId = [0xA; 16];
const B: HostId = [0xB; 16];
const C: HostId = [0xC; 16];

fn reg(s: &State, h: HostId, key: u64) -> State {
    s.apply(&h, &Command::Register { action: RegisterAction::Register, ignore_key: false, current: 0, new: key }).unwrap().0
}

fn acquire(rtype: RType, key: u64) -> Command {
    Command::Acquire { action: AcquireAction::Acquire, ignore_key: false, rtype, current: key, preempt: 0 }
}

fn release(rtype: RType, key: u64) -> Command {
    Command::Release { clear: false, ignore_key: false, rtype: rtype.code(), current: key }
}

/// A and B registered (keys 1 and 2), C not; A holds a reservation of `t`.
fn held(t: RType) -> State {
    let s = reg(&reg(&State::default(), A, 1), B, 2);
    s.apply(&A, &acquire(t, 1)).unwrap().0
}

#[test]
fn commands_parse_from_cdw10_and_data() {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&5u64.to_le_bytes());
    d[8..].copy_from_slice(&7u64.to_le_bytes());
    assert_eq!(
        Command::parse(opcode::REGISTER, 2 | (1 << 3), &d),
        Ok(Command::Register { action: RegisterAction::Replace, ignore_key: true, current: 5, new: 7 })
    );
    assert_eq!(
        Command::parse(opcode::ACQUIRE, 1 | (4 << 8), &d),
        Ok(Command::Acquire {
            action: AcquireAction::Preempt,
            ignore_key: false,
            rtype: RType::ExclusiveAccessRegistrantsOnly,
            current: 5,
            preempt: 7
        })
    );
    assert_eq!(Command::parse(opcode::RELEASE, 1, &d[..8]), Ok(Command::Release { clear: true, ignore_key: false, rtype: 0, current: 5 }));
    // Bad action, type, persistence, length, opcode.
    assert_eq!(Command::parse(opcode::REGISTER, 3, &d), Err(Status::INVALID_FIELD));
    assert_eq!(Command::parse(opcode::REGISTER, 1 << 30, &d), Err(Status::INVALID_FIELD));
    assert_eq!(Command::parse(opcode::ACQUIRE, 7 << 8, &d), Err(Status::INVALID_FIELD));
    assert_eq!(Command::parse(opcode::ACQUIRE, 3 | (1 << 8), &d), Err(Status::INVALID_FIELD));
    assert_eq!(Command::parse(opcode::RELEASE, 0, &d), Err(Status::INVALID_FIELD), "release data is 8 bytes");
    assert_eq!(Command::parse(opcode::REGISTER, 0, &d[..15]), Err(Status::INVALID_FIELD));
    assert_eq!(Command::parse(0x01, 0, &d), Err(Status::INVALID_FIELD));
}

#[test]
fn registration_rules() {
    let s = reg(&State::default(), A, 1);
    assert_eq!(s.generation, 1);
    // Registering again: the same key is fine, another is a conflict; key 0 is invalid.
    assert!(s.apply(&A, &Command::Register { action: RegisterAction::Register, ignore_key: false, current: 0, new: 1 }).is_ok());
    let again = Command::Register { action: RegisterAction::Register, ignore_key: false, current: 0, new: 9 };
    assert_eq!(s.apply(&A, &again).unwrap_err(), RESERVATION_CONFLICT);
    let zero = Command::Register { action: RegisterAction::Register, ignore_key: false, current: 0, new: 0 };
    assert_eq!(s.apply(&B, &zero).unwrap_err(), Status::INVALID_FIELD);
    // Replace and unregister need the current key (or IEKEY) and a registration.
    let replace = |current, ignore_key| Command::Register { action: RegisterAction::Replace, ignore_key, current, new: 3 };
    assert_eq!(s.apply(&A, &replace(2, false)).unwrap_err(), RESERVATION_CONFLICT);
    assert_eq!(s.apply(&A, &replace(2, true)).unwrap().0.registrants, [Registrant { host: A, key: 3 }]);
    assert_eq!(s.apply(&B, &replace(1, true)).unwrap_err(), RESERVATION_CONFLICT, "B is not registered");
    let unreg = Command::Register { action: RegisterAction::Unregister, ignore_key: false, current: 1, new: 0 };
    let (n, _) = s.apply(&A, &unreg).unwrap();
    assert!(n.registrants.is_empty());
    assert_eq!(n.generation, 2);
}

#[test]
fn every_type_decides_who_reads_and_writes() {
    // (type, B registered non-holder may (read, write), C unregistered may (read, write))
    let cases = [
        (RType::WriteExclusive, (true, false), (true, false)),
        (RType::ExclusiveAccess, (false, false), (false, false)),
        (RType::WriteExclusiveRegistrantsOnly, (true, true), (true, false)),
        (RType::ExclusiveAccessRegistrantsOnly, (true, true), (false, false)),
        (RType::WriteExclusiveAllRegistrants, (true, true), (true, false)),
        (RType::ExclusiveAccessAllRegistrants, (true, true), (false, false)),
    ];
    for (t, b, c) in cases {
        let s = held(t);
        assert!(s.may_access(&A, false) && s.may_access(&A, true), "{t:?}: the holder reads and writes");
        assert_eq!((s.may_access(&B, false), s.may_access(&B, true)), b, "{t:?}: a registrant");
        assert_eq!((s.may_access(&C, false), s.may_access(&C, true)), c, "{t:?}: a stranger");
        assert_eq!(s.holds(&B), t.all_registrants(), "{t:?}");
        // Another host cannot acquire it; the holder again with the same type can.
        let b_acquires = s.apply(&B, &acquire(t, 2));
        if t.all_registrants() {
            assert!(b_acquires.is_ok(), "{t:?}: B holds it already");
        } else {
            assert_eq!(b_acquires.unwrap_err(), RESERVATION_CONFLICT, "{t:?}");
        }
        assert!(s.apply(&A, &acquire(t, 1)).is_ok());
        let other = if t == RType::WriteExclusive { RType::ExclusiveAccess } else { RType::WriteExclusive };
        assert_eq!(s.apply(&A, &acquire(other, 1)).unwrap_err(), RESERVATION_CONFLICT, "{t:?}: another type");
        // Release: the right type only; a non-holder's release changes nothing.
        assert_eq!(s.apply(&A, &release(other, 1)).unwrap_err(), Status::INVALID_FIELD, "{t:?}");
        let (r, notices) = s.apply(&A, &release(t, 1)).unwrap();
        assert_eq!(r.reservation, None);
        let told = t.all_registrants() || matches!(t, RType::WriteExclusiveRegistrantsOnly | RType::ExclusiveAccessRegistrantsOnly);
        assert_eq!(notices, if told { vec![Notice { host: B, kind: NoticeKind::ReservationReleased }] } else { vec![] }, "{t:?}");
        if !t.all_registrants() {
            assert_eq!(s.apply(&B, &release(t, 2)).unwrap().0, s, "{t:?}: not the holder");
        }
        // Wrong key: conflict.
        assert_eq!(s.apply(&A, &release(t, 9)).unwrap_err(), RESERVATION_CONFLICT);
    }
}

#[test]
fn preempt_takes_over_and_unregisters_the_preempted() {
    let s = held(RType::WriteExclusiveRegistrantsOnly);
    let s = reg(&s, C, 3);
    let preempt = |rtype, preempt| Command::Acquire { action: AcquireAction::Preempt, ignore_key: false, rtype, current: 2, preempt };
    // B preempts A's reservation by A's key: A unregistered, B holds it with the new type.
    let (n, notices) = s.apply(&B, &preempt(RType::ExclusiveAccess, 1)).unwrap();
    assert_eq!(n.reservation, Some(Held { rtype: RType::ExclusiveAccess, holder: Some(B) }));
    assert!(n.registrants.iter().all(|r| r.host != A));
    assert!(notices.contains(&Notice { host: A, kind: NoticeKind::RegistrationPreempted }));
    assert!(notices.contains(&Notice { host: C, kind: NoticeKind::ReservationPreempted }));
    assert_eq!(n.generation, s.generation + 1);
    // By C's key (not the holder's): C unregistered, the reservation stays A's.
    let (n, _) = s.apply(&B, &preempt(RType::ExclusiveAccess, 3)).unwrap();
    assert_eq!(n.reservation, s.reservation);
    assert!(n.registrants.iter().all(|r| r.host != C));
    // Key 0 is invalid unless every registrant holds it; then it clears out every other one.
    assert_eq!(s.apply(&B, &preempt(RType::ExclusiveAccess, 0)).unwrap_err(), Status::INVALID_FIELD);
    let ar = reg(&held(RType::ExclusiveAccessAllRegistrants), C, 3);
    let (n, _) = ar.apply(&B, &preempt(RType::WriteExclusive, 0)).unwrap();
    assert_eq!(n.registrants, [Registrant { host: B, key: 2 }]);
    assert_eq!(n.reservation, Some(Held { rtype: RType::WriteExclusive, holder: Some(B) }));
    // An unregistered host cannot preempt.
    assert_eq!(s.apply(&[0xD; 16], &preempt(RType::ExclusiveAccess, 1)).unwrap_err(), RESERVATION_CONFLICT);
}

#[test]
fn clear_and_unregistering_the_holder_release_it() {
    let s = held(RType::ExclusiveAccessRegistrantsOnly);
    let (n, notices) = s.apply(&B, &Command::Release { clear: true, ignore_key: false, rtype: 0, current: 2 }).unwrap();
    assert_eq!((n.reservation, n.registrants.len()), (None, 0));
    assert_eq!(notices, [Notice { host: A, kind: NoticeKind::ReservationPreempted }]);
    let unreg = Command::Register { action: RegisterAction::Unregister, ignore_key: false, current: 1, new: 0 };
    let (n, notices) = s.apply(&A, &unreg).unwrap();
    assert_eq!(n.reservation, None, "the holder left");
    assert_eq!(notices, [Notice { host: B, kind: NoticeKind::ReservationReleased }]);
    // All Registrants: it stays while one registrant is left.
    let ar = held(RType::WriteExclusiveAllRegistrants);
    let (n, _) = ar.apply(&A, &unreg).unwrap();
    assert!(n.reservation.is_some() && n.holds(&B));
    let (n, _) = n.apply(&B, &Command::Register { action: RegisterAction::Unregister, ignore_key: true, current: 0, new: 0 }).unwrap();
    assert_eq!(n.reservation, None);
}

#[test]
fn reports_need_the_extended_format() {
    let s = held(RType::WriteExclusive);
    assert_eq!(report(&s, false, |_| 1).unwrap_err(), HOST_ID_INCONSISTENT_FORMAT);
    let r = report(&s, true, |h| if *h == A { 3 } else { 0xFFFF }).unwrap();
    use report_off::*;
    use tessera_nvme_proto::reader::{u16_at, u32_at, u64_at};
    assert_eq!((u32_at(&r, GEN), r[RTYPE], u16_at(&r, REGCTL)), (Some(s.generation), 1, Some(2)));
    assert_eq!(r.len(), HEADER_LEN + 2 * ENTRY_LEN);
    assert_eq!(
        (u16_at(&r, HEADER_LEN + ENTRY_CNTLID), r[HEADER_LEN + ENTRY_RCSTS], u64_at(&r, HEADER_LEN + ENTRY_RKEY)),
        (Some(3), 1, Some(1))
    );
    assert_eq!(&r[HEADER_LEN + ENTRY_HOSTID..HEADER_LEN + ENTRY_HOSTID + 16], &A);
    let second = HEADER_LEN + ENTRY_LEN;
    assert_eq!((u16_at(&r, second), r[second + ENTRY_RCSTS]), (Some(0xFFFF), 0));
}

fn any_command() -> impl Strategy<Value = Command> {
    let key = prop_oneof![Just(0u64), 1u64..4];
    let rtype = (1u8..=6).prop_map(|t| RType::from_code(t).unwrap_or(RType::WriteExclusive));
    prop_oneof![
        (0u8..3, any::<bool>(), key.clone(), key.clone()).prop_map(|(a, ignore_key, current, new)| Command::Register {
            action: [RegisterAction::Register, RegisterAction::Unregister, RegisterAction::Replace][a as usize % 3],
            ignore_key,
            current,
            new
        }),
        (0u8..3, any::<bool>(), rtype, key.clone(), key.clone()).prop_map(|(a, ignore_key, rtype, current, preempt)| Command::Acquire {
            action: [AcquireAction::Acquire, AcquireAction::Preempt, AcquireAction::PreemptAbort][a as usize % 3],
            ignore_key,
            rtype,
            current,
            preempt
        }),
        (any::<bool>(), any::<bool>(), 0u8..8, key).prop_map(|(clear, ignore_key, rtype, current)| Command::Release {
            clear,
            ignore_key,
            rtype,
            current
        }),
    ]
}

proptest! {
    /// Any sequence of commands from three hosts keeps the state well formed: each host
    /// registered once with a non-zero key, a single holder that is a registrant, no holder for
    /// the All Registrants types, no reservation without registrants; a refused command changes
    /// nothing.
    #[test]
    fn states_stay_well_formed(cmds in proptest::collection::vec((0usize..3, any_command()), 0..40)) {
        let hosts = [A, B, C];
        let mut s = State::default();
        for (h, cmd) in cmds {
            if let Ok((next, notices)) = s.apply(&hosts[h], &cmd) {
                prop_assert!(notices.iter().all(|n| n.host != hosts[h]), "nobody is told of their own command");
                s = next;
            }
            let mut seen: Vec<HostId> = s.registrants.iter().map(|r| r.host).collect();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), s.registrants.len());
            prop_assert!(s.registrants.iter().all(|r| r.key != 0));
            if let Some(h) = s.reservation {
                prop_assert!(!s.registrants.is_empty());
                match h.holder {
                    Some(holder) => prop_assert!(!h.rtype.all_registrants() && s.registrants.iter().any(|r| r.host == holder)),
                    None => prop_assert!(h.rtype.all_registrants()),
                }
            }
        }
    }
}
