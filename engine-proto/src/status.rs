//! Code-valued enums of the protocol: the reply status ([`RpcStatus`], header offset 24) and a
//! target's health ([`TargetHealth`], in `TargetInfo`). Both keep codes they do not know as values
//! (`Unknown`), so a newer peer's codes pass through instead of failing the decode.

use std::fmt;

/// Status of a reply (header field `status`). `Ok` is 0; anything else is an error reply whose
/// body is a UTF-8 message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum RpcStatus {
    /// Success.
    Ok,
    /// The request was malformed or its values are not allowed.
    InvalidRequest,
    /// An update's data does not match the checksums it came with.
    ChecksumMismatch,
    /// Stored data failed its checksum on fetch.
    DataCorrupt,
    /// The target has no space for the update.
    NoSpace,
    /// The request's pool map version is older than the newest the engine has seen.
    StaleMapVersion,
    /// The engine has no target with the header's target index.
    NoSuchTarget,
    /// The target's storage failed.
    IoError,
    /// The engine is shutting down and takes no new requests.
    ShuttingDown,
    /// The opcode is not one this engine implements.
    UnknownOpcode,
    /// A request or its reply would exceed a size limit.
    TooLarge,
    /// A host update or punch whose epoch is at or below the target's stable floor: it arrived
    /// more than the commit window after its epoch was taken (or the sender's clock lags). The
    /// sender retries at a new epoch; nothing was changed.
    EpochTooOld,
    /// A code this implementation does not know (never 0..=11).
    Unknown(u32),
}

impl RpcStatus {
    /// The status for a wire code.
    pub fn from_code(code: u32) -> RpcStatus {
        use RpcStatus::*;
        match code {
            0 => Ok,
            1 => InvalidRequest,
            2 => ChecksumMismatch,
            3 => DataCorrupt,
            4 => NoSpace,
            5 => StaleMapVersion,
            6 => NoSuchTarget,
            7 => IoError,
            8 => ShuttingDown,
            9 => UnknownOpcode,
            10 => TooLarge,
            11 => EpochTooOld,
            other => Unknown(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u32 {
        use RpcStatus::*;
        match self {
            Ok => 0,
            InvalidRequest => 1,
            ChecksumMismatch => 2,
            DataCorrupt => 3,
            NoSpace => 4,
            StaleMapVersion => 5,
            NoSuchTarget => 6,
            IoError => 7,
            ShuttingDown => 8,
            UnknownOpcode => 9,
            TooLarge => 10,
            EpochTooOld => 11,
            Unknown(c) => c,
        }
    }

    /// Whether this is success.
    pub fn is_ok(self) -> bool {
        self.code() == 0
    }
}

impl From<u32> for RpcStatus {
    fn from(code: u32) -> Self {
        RpcStatus::from_code(code)
    }
}

impl From<RpcStatus> for u32 {
    fn from(s: RpcStatus) -> Self {
        s.code()
    }
}

impl fmt::Display for RpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use RpcStatus::*;
        let s = match self {
            Ok => "ok",
            InvalidRequest => "invalid request",
            ChecksumMismatch => "checksum mismatch",
            DataCorrupt => "data corrupt",
            NoSpace => "no space",
            StaleMapVersion => "stale map version",
            NoSuchTarget => "no such target",
            IoError => "I/O error",
            ShuttingDown => "shutting down",
            UnknownOpcode => "unknown opcode",
            TooLarge => "too large",
            EpochTooOld => "epoch too old",
            Unknown(c) => return write!(f, "status {c}"),
        };
        f.write_str(s)
    }
}

/// Health of a target as reported by `QueryTarget`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TargetHealth {
    /// Serving reads and writes.
    Healthy,
    /// Serving reads only (for example out of space or a degraded device).
    ReadOnly,
    /// Not serving.
    Failed,
    /// A code this implementation does not know (never 0..=2).
    Unknown(u8),
}

impl TargetHealth {
    /// The health for a wire code.
    pub fn from_code(code: u8) -> TargetHealth {
        match code {
            0 => TargetHealth::Healthy,
            1 => TargetHealth::ReadOnly,
            2 => TargetHealth::Failed,
            other => TargetHealth::Unknown(other),
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            TargetHealth::Healthy => 0,
            TargetHealth::ReadOnly => 1,
            TargetHealth::Failed => 2,
            TargetHealth::Unknown(c) => c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_values_are_kept() {
        for c in 0..300u32 {
            assert_eq!(RpcStatus::from_code(c).code(), c);
        }
        assert_eq!(RpcStatus::from_code(5), RpcStatus::StaleMapVersion);
        assert_eq!(RpcStatus::from_code(11), RpcStatus::EpochTooOld);
        assert_eq!(RpcStatus::from_code(12), RpcStatus::Unknown(12));
        assert_eq!(RpcStatus::from_code(u32::MAX).code(), u32::MAX);
        assert!(RpcStatus::Ok.is_ok() && !RpcStatus::TooLarge.is_ok());
        assert_eq!(RpcStatus::DataCorrupt.to_string(), "data corrupt");
        assert_eq!(RpcStatus::Unknown(42).to_string(), "status 42");
        for c in 0..=255u8 {
            assert_eq!(TargetHealth::from_code(c).code(), c);
        }
        assert_eq!(TargetHealth::from_code(1), TargetHealth::ReadOnly);
    }
}
