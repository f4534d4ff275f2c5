//! The one walker over a STUN message's attributes (RFC 8489 §14), for code that must look
//! at raw bytes before (or without) a full parse: integrity checking, the TCP handover's
//! CONNECTION-ID lookup, tests reading answers. No allocation, never reads past the end.

use super::{attr, class, message_type, method, pad4, HEADER_LEN, MAGIC_COOKIE};

/// One attribute as it sits in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttr<'a> {
    pub ty: u16,
    /// Offset of the attribute's 4-byte header in the message.
    pub offset: usize,
    /// The value, `None` when its declared length runs past the message end (then this
    /// is the last attribute the walker yields).
    pub value: Option<&'a [u8]>,
}

/// Iterator over the attributes of `msg` (a whole message, header included). Stops at the
/// end, at a header that does not fit, or after an attribute whose value does not fit.
pub fn attributes(msg: &[u8]) -> Attributes<'_> {
    Attributes {
        msg,
        off: HEADER_LEN,
    }
}

/// See [`attributes`].
pub struct Attributes<'a> {
    msg: &'a [u8],
    off: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttr<'a>;

    fn next(&mut self) -> Option<RawAttr<'a>> {
        let off = self.off;
        let h = self.msg.get(off..off.checked_add(4)?)?;
        let ty = u16::from_be_bytes([h[0], h[1]]);
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let value = self.msg.get(off + 4..off + 4 + len);
        self.off = if value.is_some() {
            off + 4 + pad4(len)
        } else {
            usize::MAX - 4
        };
        Some(RawAttr {
            ty,
            offset: off,
            value,
        })
    }
}

/// The value of the first attribute of type `ty`, if it is there whole.
pub fn find_attr(msg: &[u8], ty: u16) -> Option<&[u8]> {
    attributes(msg).find(|a| a.ty == ty).and_then(|a| a.value)
}

/// The CONNECTION-ID of a ConnectionBind request (RFC 6062 §6.2.1), if `frame` is one.
/// Only locates the attribute (the TCP driver routes the connection by it); the owning
/// TURN core checks everything else.
pub fn connection_bind_id(frame: &[u8]) -> Option<u32> {
    if frame.len() < HEADER_LEN
        || u16::from_be_bytes([frame[0], frame[1]])
            != message_type(method::CONNECTION_BIND, class::REQUEST)
        || u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) != MAGIC_COOKIE
    {
        return None;
    }
    Some(u32::from_be_bytes(
        find_attr(frame, attr::CONNECTION_ID)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::test_message;

    fn bind_request(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        test_message(
            message_type(method::CONNECTION_BIND, class::REQUEST),
            [7; 12],
            attrs,
        )
    }

    #[test]
    fn finds_the_connection_id_after_other_attributes() {
        let m = bind_request(&[
            (attr::USERNAME, b"alice"),
            (attr::CONNECTION_ID, &0x0100_0007u32.to_be_bytes()),
        ]);
        assert_eq!(connection_bind_id(&m), Some(0x0100_0007));
    }

    #[test]
    fn ignores_other_methods_and_malformed_attributes() {
        let mut m = bind_request(&[(attr::CONNECTION_ID, &[0, 0, 0, 1])]);
        assert_eq!(connection_bind_id(&m), Some(1));
        m[1] = 0x0A; // Connect, not ConnectionBind
        assert_eq!(connection_bind_id(&m), None);
        let short = bind_request(&[(attr::CONNECTION_ID, &[0, 1])]);
        assert_eq!(connection_bind_id(&short), None);
        let mut truncated = bind_request(&[(attr::USERNAME, b"bob")]);
        truncated[HEADER_LEN + 3] = 200; // attribute longer than the message
        assert_eq!(connection_bind_id(&truncated), None);
        assert_eq!(connection_bind_id(&[0u8; 8]), None);
    }

    #[test]
    fn walker_stops_after_a_truncated_value() {
        let mut m = bind_request(&[(attr::USERNAME, b"bob"), (attr::NONCE, b"n")]);
        let all: Vec<_> = attributes(&m).map(|a| (a.ty, a.offset)).collect();
        assert_eq!(all, [(attr::USERNAME, 20), (attr::NONCE, 28)]);
        m[HEADER_LEN + 3] = 200;
        let cut: Vec<_> = attributes(&m).collect();
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].value, None);
    }
}
