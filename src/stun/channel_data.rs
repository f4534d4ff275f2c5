//! ChannelData message header (RFC 8656 §12.4).

/// Length of the ChannelData header: channel number and length, 2 bytes each.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// Writes a ChannelData header into `dst[..4]` (RFC 8656 §12.4). Panics if `dst` is
/// shorter than 4 bytes (a caller bug, never network input).
pub fn write_channel_data_header(dst: &mut [u8], channel: u16, payload_len: u16) {
    dst[..2].copy_from_slice(&channel.to_be_bytes());
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
            channel in 0x4000u16..=0x7FFE,
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
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
