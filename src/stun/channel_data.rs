//! ChannelData message header (RFC 8656 §12.4).

use super::{CHANNEL_MAX, CHANNEL_MIN};

/// Length of the ChannelData header: channel number and length, 2 bytes each.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// A channel number a client may bind (RFC 8656 §12): [`CHANNEL_MIN`]..=[`CHANNEL_MAX`].
/// RFC 8656 allows 0x4000-0x4FFF; the range is wider for RFC 5766 clients (see
/// `CHANNEL_MAX`). Made only by [`ChannelNumber::new`], so every value in Tern is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    /// `n` if it is in the accepted range, else `None` (a ChannelBind answers 400, a
    /// ChannelData message is dropped).
    pub const fn new(n: u16) -> Option<ChannelNumber> {
        if n >= CHANNEL_MIN && n <= CHANNEL_MAX {
            Some(ChannelNumber(n))
        } else {
            None
        }
    }

    /// The number as it goes on the wire.
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// Writes a ChannelData header into `dst[..4]` (RFC 8656 §12.4). Panics if `dst` is
/// shorter than 4 bytes (a caller bug, never network input).
pub fn write_channel_data_header(dst: &mut [u8], channel: ChannelNumber, payload_len: u16) {
    dst[..2].copy_from_slice(&channel.get().to_be_bytes());
    dst[2..4].copy_from_slice(&payload_len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{classify, tcp_frame_len, Kind};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn header_round_trips_through_classify_and_framing(
            channel in 0x4000u16..=0x7FFF,
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let channel = ChannelNumber::new(channel).unwrap();
            let mut buf = vec![0u8; CHANNEL_DATA_HEADER + payload.len() + 3];
            write_channel_data_header(&mut buf, channel, payload.len() as u16);
            buf[4..4 + payload.len()].copy_from_slice(&payload);
            let udp = &buf[..4 + payload.len()];
            prop_assert_eq!(classify(udp), Kind::ChannelData { channel, len: payload.len() });
            // Over TCP the frame includes padding to a multiple of 4 (RFC 8656 §12.5).
            let padded = crate::stun::pad4(4 + payload.len());
            prop_assert_eq!(tcp_frame_len(&buf[..padded]), Ok(Some(padded)));
            if padded > 4 {
                prop_assert_eq!(tcp_frame_len(&buf[..padded - 1]), Ok(None));
            }
        }
    }
}
