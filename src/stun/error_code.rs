//! STUN error codes (RFC 8489 §14.8, §18.3; RFC 8656 §18; RFC 6062 §6.3) and their
//! reason phrases: the values an ERROR-CODE attribute carries.

/// An ERROR-CODE value this server sends. `code()` is the number on the wire
/// (class * 100 + number), `reason()` the phrase written after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 300 (RFC 8489 §10).
    TryAlternate,
    /// 400.
    BadRequest,
    /// 401 (RFC 8489 §9.2.4).
    Unauthorized,
    /// 403 (RFC 8656 §9.1: peer denied by policy).
    Forbidden,
    /// 420 (RFC 8489 §6.3.1).
    UnknownAttribute,
    /// 437 (RFC 8656 §7.2).
    AllocationMismatch,
    /// 438 (RFC 8489 §9.2.4).
    StaleNonce,
    /// 440 (RFC 8656 §7.2).
    AddressFamilyNotSupported,
    /// 441 (RFC 8656 §7.3).
    WrongCredentials,
    /// 442 (RFC 8656 §7.2).
    UnsupportedTransport,
    /// 443 (RFC 8656 §9.1, §11.2).
    PeerAddressFamilyMismatch,
    /// 446 (RFC 6062 §5.2).
    ConnectionAlreadyExists,
    /// 447 (RFC 6062 §5.2).
    ConnectionTimeoutOrFailure,
    /// 486 (RFC 8656 §7.2).
    AllocationQuotaReached,
    /// 500.
    ServerError,
    /// 508 (RFC 8656 §7.2).
    InsufficientCapacity,
}

impl ErrorCode {
    /// The number on the wire: class * 100 + number.
    pub const fn code(self) -> u16 {
        match self {
            ErrorCode::TryAlternate => 300,
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownAttribute => 420,
            ErrorCode::AllocationMismatch => 437,
            ErrorCode::StaleNonce => 438,
            ErrorCode::AddressFamilyNotSupported => 440,
            ErrorCode::WrongCredentials => 441,
            ErrorCode::UnsupportedTransport => 442,
            ErrorCode::PeerAddressFamilyMismatch => 443,
            ErrorCode::ConnectionAlreadyExists => 446,
            ErrorCode::ConnectionTimeoutOrFailure => 447,
            ErrorCode::AllocationQuotaReached => 486,
            ErrorCode::ServerError => 500,
            ErrorCode::InsufficientCapacity => 508,
        }
    }

    /// The reason phrase (RFC 8489 §14.8, RFC 8656 §18, RFC 6062 §6.3).
    pub const fn reason(self) -> &'static str {
        match self {
            ErrorCode::TryAlternate => "Try Alternate",
            ErrorCode::BadRequest => "Bad Request",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::UnknownAttribute => "Unknown Attribute",
            ErrorCode::AllocationMismatch => "Allocation Mismatch",
            ErrorCode::StaleNonce => "Stale Nonce",
            ErrorCode::AddressFamilyNotSupported => "Address Family not Supported",
            ErrorCode::WrongCredentials => "Wrong Credentials",
            ErrorCode::UnsupportedTransport => "Unsupported Transport Protocol",
            ErrorCode::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            ErrorCode::ConnectionAlreadyExists => "Connection Already Exists",
            ErrorCode::ConnectionTimeoutOrFailure => "Connection Timeout or Failure",
            ErrorCode::AllocationQuotaReached => "Allocation Quota Reached",
            ErrorCode::ServerError => "Server Error",
            ErrorCode::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn codes_are_class_and_number() {
        assert_eq!(ErrorCode::TryAlternate.code(), 300);
        assert_eq!(ErrorCode::StaleNonce.code(), 438);
        assert_eq!(ErrorCode::ConnectionTimeoutOrFailure.code(), 447);
        assert_eq!(
            ErrorCode::InsufficientCapacity.reason(),
            "Insufficient Capacity"
        );
    }
}
