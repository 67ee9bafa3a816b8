//! Fuzzes the per-connection protocol state machine (`tessera_nvmf::queue::Queue::receive`).
//!
//! Input layout: byte 0 = options, byte 1 = `c`, then `c & 7` chunk-length bytes (each `b` means
//! a chunk of `b + 1` bytes; the lengths are used in turn, over and over; none means each piece
//! of input in one chunk), then the body. The host's bytes are fed to `receive` chunk by chunk.
//!
//! Options: bits 5:3 give the initial queue depth (1 to 8). Bit 2 set: the harness first sends a
//! valid ICReq asking for the digests in bits 1:0 (bit 0 header, bit 1 data), so the fuzzer starts
//! past the handshake. Bit 6 clear ("raw"): the body is the byte stream. Bit 6 set ("framed",
//! implies the ICReq): the body is a list of records, each encoded as a PDU with the negotiated
//! digests and fed before the next is read, so that deep states (commands, R2T/H2CData
//! exchanges) are reached without a seed corpus. A record starts with a tag byte; its bits 2:0
//! pick
//! - 0, 4: CapsuleCmd: one byte `n`, the 64-byte SQE, then `16 * n` bytes of in-capsule data;
//! - 1: H2CData with every field from the input: CCCID u16, TTAG u16, DATAO u32, length u16
//!   (mod 8192), data a fixed pattern; LAST_PDU is tag bit 7;
//! - 2, 5, 6: H2CData that continues a transfer the queue solicited: one byte picks an
//!   outstanding R2T, a u16 `len`; CCCID, TTAG and DATAO are the expected ones, the length is
//!   all that is left (capped at MAXH2CDATA) if tag bit 7 is set, else `len` mod (what is left
//!   + 1); LAST_PDU is set when the transfer is complete, inverted if tag bit 6 is set. Nothing
//!   is sent when no R2T is outstanding;
//! - 3: H2CTermReq: FES u16;
//! - 7: raw bytes: one byte `n`, then `n` bytes sent as they are.
//!
//! Missing input bytes read as zero.
//!
//! The harness plays the server: a command whose SQE says host-to-controller data (opcode bits
//! 1:0 = 01) and carries no in-capsule data gets an R2T for its SGL length (modulo 16 KiB + 1)
//! via `request_data`; controller-to-host commands (10) complete with up to 4 KiB of data; 00
//! completes without data; 11 is held with `hold` (like an Asynchronous Event Request; a later
//! command with its CID abandons it). A Fabrics Connect is applied with `on_connected` before it
//! completes. Data that arrives is completed.
//!
//! Properties checked: nothing panics; every `DataReady` carries exactly the solicited length;
//! and everything the queue sends (including the C2HTermReq after the first error, where the run
//! stops) is a sequence of whole, valid PDUs for a host decoder that follows the negotiated
//! digests.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tessera_nvme_proto::fabrics::{ConnectCmd, CATTR_DISABLE_SQFLOW};
use tessera_nvme_proto::opcode::{fctype, FABRICS};
use tessera_nvme_proto::pdu::{self, DataPdu, IcReq, Pdu, TermReq};
use tessera_nvme_proto::sqe::SQE_LEN;
use tessera_nvme_proto::{Cqe, Digests, PduLimits, Sqe, Status};
use tessera_nvmf::queue::{Event, Queue, QueueParams};

const MAX_R2T: u32 = 16 * 1024;
const MAX_READ: u32 = 4096;
const MAXH2CDATA: u32 = 4096;

/// An R2T the harness asked the queue to send: command id, length, bytes the host sent so far.
struct Solicited {
    cid: u16,
    total: u32,
    sent: u32,
}

/// The server side of the harness plus the host's view of what the queue sent.
struct Conn<'a> {
    q: Queue<u32>,
    /// Received bytes not yet decoded by the queue.
    buf: BytesMut,
    /// Chunk lengths and the index of the next one.
    lens: &'a [u8],
    next_len: usize,
    /// What the queue sent, not yet decoded by the host, and the digests the host applies.
    wire: BytesMut,
    host_digests: Digests,
    solicited: Vec<Solicited>,
}

impl Conn<'_> {
    /// Feeds `bytes` chunk by chunk. Returns false once the connection is over (the queue
    /// reported an error, which the harness then terminates, or the host terminated).
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            let len = match self.lens.get(self.next_len % self.lens.len().max(1)) {
                Some(&b) => usize::from(b) + 1,
                None => bytes.len(),
            };
            self.next_len += 1;
            let (chunk, rest) = bytes.split_at(len.min(bytes.len()));
            self.buf.extend_from_slice(chunk);
            bytes = rest;

            let mut events = Vec::new();
            let res = self.q.receive(&mut self.buf, &mut events);
            let open = self.serve(events);
            self.absorb();
            if let Err(e) = res {
                self.q.terminate(&e);
                assert!(self.q.is_closed());
                self.absorb();
                return false;
            }
            if !open {
                return false;
            }
            if bytes.is_empty() {
                return true;
            }
        }
    }

    fn serve(&mut self, events: Vec<Event<u32>>) -> bool {
        let q = &mut self.q;
        for ev in events {
            match ev {
                Event::Command { sqe, incapsule } => {
                    let cid = sqe.cid();
                    if sqe.opcode() == FABRICS && sqe.fctype() == fctype::CONNECT {
                        let c = ConnectCmd::from_sqe(&sqe);
                        q.on_connected(c.qid, c.sqsize.saturating_add(1), c.cattr & CATTR_DISABLE_SQFLOW != 0);
                        q.complete(cid, Cqe::new(cid, Status::SUCCESS), None);
                        continue;
                    }
                    match sqe.opcode() & 3 {
                        1 if incapsule.is_empty() => {
                            let len = sqe.sgl().length % (MAX_R2T + 1);
                            q.request_data(sqe, len, len);
                            self.solicited.retain(|s| s.cid != cid);
                            self.solicited.push(Solicited { cid, total: len, sent: 0 });
                        }
                        2 => {
                            let len = sqe.sgl().length.min(MAX_READ) as usize;
                            let data = (len > 0).then(|| Bytes::from(vec![cid as u8; len]));
                            q.complete(cid, Cqe::new(cid, Status::SUCCESS), data);
                        }
                        3 => q.hold(cid), // like an Asynchronous Event Request
                        _ => q.complete(cid, Cqe::new(cid, Status::SUCCESS), None),
                    }
                }
                Event::DataReady { sqe, payload, data } => {
                    let got: usize = data.iter().map(Bytes::len).sum();
                    assert_eq!(got, payload as usize, "DataReady with {got} bytes for an R2T of {payload}");
                    let cid = sqe.cid();
                    self.solicited.retain(|s| s.cid != cid);
                    q.complete(cid, Cqe::new(cid, Status::SUCCESS), None);
                }
                Event::HostTerminated { .. } => {
                    assert!(q.is_closed(), "H2CTermReq did not close the queue");
                    return false;
                }
                // A new command reused a held command's CID; its Command event follows.
                Event::Abandoned { .. } => {}
            }
        }
        true
    }

    /// Decodes everything the queue sent as the host would.
    fn absorb(&mut self) {
        for chunk in self.q.take_output() {
            self.wire.extend_from_slice(&chunk);
        }
        let limits = PduLimits { max_capsule_data: u32::MAX, max_data_pdu: u32::MAX };
        loop {
            match pdu::decode(&mut self.wire, self.host_digests, &limits) {
                Ok(Some(Pdu::IcResp(r))) => self.host_digests = r.digests,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("the queue sent an invalid PDU: {e:?}"),
            }
        }
        // A data PDU's header, data and digest may be separate output chunks, but they are
        // pushed together, so the output always ends on a PDU boundary.
        assert!(self.wire.is_empty(), "the queue sent a partial PDU: {:02x?}", &self.wire[..]);
    }
}

/// Reads the body of a framed input; past the end every read is zero.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.0.len());
        let (head, tail) = self.0.split_at(k);
        self.0 = tail;
        let mut v = head.to_vec();
        v.resize(n, 0);
        v
    }

    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
}

/// Encodes the next record of a framed body; empty if it sends nothing.
fn next_record(r: &mut Reader<'_>, conn: &mut Conn<'_>, digests: Digests) -> BytesMut {
    let mut out = BytesMut::new();
    let tag = r.u8();
    match tag & 7 {
        0 | 4 => {
            let n = usize::from(r.u8()) * 16;
            let sqe = Sqe::from_slice(&r.bytes(SQE_LEN)).unwrap_or_else(|| Sqe::new(0, 0));
            let data = Bytes::from(r.bytes(n));
            Pdu::CapsuleCmd { sqe, data }.encode(digests, &mut out);
        }
        1 => {
            let (cccid, ttag, datao) = (r.u16(), r.u16(), r.u32());
            let len = usize::from(r.u16() % 8192);
            let data = Bytes::from(vec![0xa5; len]);
            let last = tag & 0x80 != 0;
            Pdu::H2cData(DataPdu { cccid, ttag, datao, data, last, success: false }).encode(digests, &mut out);
        }
        2 | 5 | 6 => {
            let (pick, want) = (r.u8(), r.u16());
            let n = conn.solicited.len();
            let Some(s) = conn.solicited.get_mut(usize::from(pick) % n.max(1)) else {
                return out;
            };
            let left = s.total.saturating_sub(s.sent);
            let len = if tag & 0x80 != 0 { left.min(MAXH2CDATA) } else { u32::from(want) % (left + 1) };
            let last = (s.sent + len == s.total) != (tag & 0x40 != 0);
            let d = DataPdu { cccid: s.cid, ttag: s.cid, datao: s.sent, data: Bytes::from(vec![0x5a; len as usize]), last, success: false };
            s.sent += len;
            Pdu::H2cData(d).encode(digests, &mut out);
        }
        3 => Pdu::H2cTermReq(TermReq { fes: r.u16(), fei: 0, data: Bytes::new() }).encode(digests, &mut out),
        _ => {
            let n = usize::from(r.u8());
            out.extend_from_slice(&r.bytes(n));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [opts, c, rest @ ..] = data else {
        return;
    };
    let n = usize::from(c & 7).min(rest.len());
    let (lens, body) = rest.split_at(n);
    let params = QueueParams { max_capsule_data: 4096, maxh2cdata: MAXH2CDATA, initial_depth: 1 + u16::from((opts >> 3) & 7) };
    let mut conn = Conn {
        q: Queue::new(params),
        buf: BytesMut::new(),
        lens,
        next_len: 0,
        wire: BytesMut::new(),
        host_digests: Digests::default(),
        solicited: Vec::new(),
    };
    let framed = opts & 0x40 != 0;
    let digests = Digests { header: opts & 1 != 0, data: opts & 2 != 0 };
    if framed || opts & 4 != 0 {
        let icreq = Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests, maxr2t: 0 }).to_bytes(Digests::default());
        if !conn.feed(&icreq) {
            return;
        }
    }
    if !framed {
        conn.feed(body);
        return;
    }
    let mut r = Reader(body);
    while !r.0.is_empty() {
        let rec = next_record(&mut r, &mut conn, digests);
        if !rec.is_empty() && !conn.feed(&rec) {
            return;
        }
    }
});
