//! G.711 (ITU-T G.711) mu-law and A-law expansion to 16-bit linear PCM.
//!
//! Two 256-entry tables built at compile time with the classic segment/quantisation formula
//! (the values of Sun's reference `g711.c`, which ffmpeg's `pcm_mulaw`/`pcm_alaw` also produce).

/// Expands one mu-law byte: `0x00 -> -32124`, `0x80 -> 32124`, `0x7F`/`0xFF -> 0`.
pub const fn mulaw_to_linear(byte: u8) -> i16 {
    let u = !byte;
    let t = (((u & 0x0F) as i32) << 3) + 0x84;
    let t = t << ((u & 0x70) >> 4);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// Expands one A-law byte: `0xD5 -> 8`, `0x55 -> -8`, `0xAA -> 32256`, `0x2A -> -32256`.
pub const fn alaw_to_linear(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let mut t = ((a & 0x0F) as i32) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => t = (t + 0x108) << (seg - 1),
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

macro_rules! table {
    ($f:ident) => {{
        let mut t = [0i16; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = $f(i as u8);
            i += 1;
        }
        t
    }};
}

/// mu-law byte -> linear sample.
pub static MULAW: [i16; 256] = table!(mulaw_to_linear);
/// A-law byte -> linear sample.
pub static ALAW: [i16; 256] = table!(alaw_to_linear);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_matches_ffmpeg_endpoints() {
        assert_eq!(MULAW[0x00], -32124);
        assert_eq!(MULAW[0x80], 32124);
        assert_eq!(MULAW[0x7F], 0);
        assert_eq!(MULAW[0xFF], 0);
    }

    #[test]
    fn alaw_endpoints() {
        assert_eq!(ALAW[0xD5], 8);
        assert_eq!(ALAW[0x55], -8);
        assert_eq!(ALAW[0xAA], 32256);
        assert_eq!(ALAW[0x2A], -32256);
    }
}
