//! Message boundaries in a TCP/TLS byte stream (RFC 8489 §6.2.2, RFC 8656 §12.5).

use super::{pad4, HEADER_LEN, MAGIC_COOKIE};

/// The stream holds bytes that are neither STUN nor ChannelData: the caller closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("first bits are neither STUN (00) nor ChannelData (01)")]
    UnknownFrame,
    #[error("STUN message without the magic cookie")]
    BadCookie,
    #[error("STUN message length {0} is not a multiple of 4")]
    BadLength(u16),
}

/// Length of the first frame in `buf`: `Ok(None)` if more bytes are needed,
/// `Ok(Some(n))` if `buf[..n]` is one whole STUN message or one ChannelData message
/// including its padding to a multiple of 4 (RFC 8656 §12.5).
pub fn tcp_frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first >> 6 {
        0b00 => {
            if buf.len() >= 8 {
                let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                if cookie != MAGIC_COOKIE {
                    return Err(FrameError::BadCookie);
                }
            }
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]);
            if len % 4 != 0 {
                return Err(FrameError::BadLength(len));
            }
            let n = HEADER_LEN + len as usize;
            Ok((buf.len() >= n).then_some(n))
        }
        0b01 => {
            // The bits 01 are the whole accepted channel range, 0x4000-0x7FFF
            // (`stun::CHANNEL_MAX`): every such frame is ChannelData.
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            let n = pad4(4 + len);
            Ok((buf.len() >= n).then_some(n))
        }
        _ => Err(FrameError::UnknownFrame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_frames() {
        let mut m = vec![0u8; 28];
        m[1] = 1;
        m[3] = 8;
        m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[0x40, 0, 0, 1, 9, 0, 0, 0]);
        assert_eq!(tcp_frame_len(&m[..0]), Ok(None));
        assert_eq!(tcp_frame_len(&m[..3]), Ok(None));
        assert_eq!(tcp_frame_len(&m[..27]), Ok(None));
        assert_eq!(tcp_frame_len(&m), Ok(Some(28)));
        assert_eq!(tcp_frame_len(&m[28..]), Ok(Some(8)));
        assert_eq!(tcp_frame_len(&m[28..35]), Ok(None));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            tcp_frame_len(&[0xC0, 0, 0, 0]),
            Err(FrameError::UnknownFrame)
        );
        // ASCII such as "GET " or "POST" starts with bits 01: it frames as ChannelData
        // waiting for more bytes, and the driver's idle timeout closes the connection.
        assert_eq!(tcp_frame_len(b"POST /"), Ok(None));
        assert_eq!(
            tcp_frame_len(&[0, 1, 0, 0, 1, 2, 3, 4]),
            Err(FrameError::BadCookie)
        );
        assert_eq!(tcp_frame_len(&[0, 1, 0, 3]), Err(FrameError::BadLength(3)));
        // 0x7FFF is a channel (RFC 5766 §11 range, as coturn's clients use it).
        assert_eq!(tcp_frame_len(&[0x7F, 0xFF, 0, 0]), Ok(Some(4)));
    }
}
