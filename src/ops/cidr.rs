//! coturn's peer address forms (`ip`, `ip1-ip2`, `net/len`) as exact CIDR blocks, for
//! `turn.allowed_peer_ranges` / `turn.denied_peer_ranges`.

use std::net::IpAddr;

use ipnet::IpNet;

/// Minimal CIDR blocks covering exactly `lo..=hi` (both of the same family).
pub(super) fn range_to_cidrs(lo: IpAddr, hi: IpAddr) -> Option<Vec<IpNet>> {
    let (bits, mut a, b) = match (lo, hi) {
        (IpAddr::V4(l), IpAddr::V4(h)) => {
            (32u32, u128::from(u32::from(l)), u128::from(u32::from(h)))
        }
        (IpAddr::V6(l), IpAddr::V6(h)) => (128u32, u128::from(l), u128::from(h)),
        _ => return None,
    };
    if a > b {
        return None;
    }
    let mask = |k: u32| {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut out = Vec::new();
    loop {
        // The largest block starting at `a` (aligned to its size) that ends by `b`.
        let mut k = if a == 0 {
            bits
        } else {
            a.trailing_zeros().min(bits)
        };
        while k > 0 && (a | mask(k)) > b {
            k -= 1;
        }
        let prefix = (bits - k) as u8;
        out.push(if bits == 32 {
            IpNet::new(IpAddr::V4((a as u32).into()), prefix).ok()?
        } else {
            IpNet::new(IpAddr::V6(a.into()), prefix).ok()?
        });
        let end = a | mask(k);
        if end >= b {
            return Some(out);
        }
        a = end + 1;
    }
}

/// `ip`, `ip1-ip2` or `net/len` as CIDR blocks.
pub(super) fn peer_ranges(value: &str) -> Option<Vec<IpNet>> {
    let v = value.trim();
    if let Some((l, h)) = v.split_once('-') {
        return range_to_cidrs(l.trim().parse().ok()?, h.trim().parse().ok()?);
    }
    if let Ok(net) = v.parse::<IpNet>() {
        return Some(vec![net.trunc()]);
    }
    let ip: IpAddr = v.parse().ok()?;
    Some(vec![IpNet::from(ip)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(lo: &str, hi: &str) -> Option<Vec<String>> {
        range_to_cidrs(lo.parse().unwrap(), hi.parse().unwrap())
            .map(|v| v.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn ranges_become_exact_cidr_blocks() {
        assert_eq!(
            cidrs("10.0.0.1", "10.0.0.6").unwrap(),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(cidrs("0.0.0.0", "255.255.255.255").unwrap(), ["0.0.0.0/0"]);
        assert_eq!(cidrs("192.0.2.7", "192.0.2.7").unwrap(), ["192.0.2.7/32"]);
        assert_eq!(
            cidrs("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            ["::/0"]
        );
        assert_eq!(
            cidrs("fe80::", "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            ["fe80::/10"]
        );
        assert_eq!(cidrs("10.0.0.2", "10.0.0.1"), None);
        assert_eq!(cidrs("10.0.0.1", "::1"), None);
    }

    #[test]
    fn peer_values() {
        let s =
            |v: &str| peer_ranges(v).map(|v| v.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        assert_eq!(s("192.0.2.1").unwrap(), ["192.0.2.1/32"]);
        assert_eq!(s("192.0.2.9/24").unwrap(), ["192.0.2.0/24"]);
        assert_eq!(s(" 10.0.0.0 - 10.0.0.255 ").unwrap(), ["10.0.0.0/24"]);
        assert_eq!(s("nonsense"), None);
    }
}
