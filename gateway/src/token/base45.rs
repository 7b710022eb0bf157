//! Base45 (RFC 9285): the QR-code alphanumeric alphabet, 2 bytes in 3 characters.

const ALPHABET: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/// Why a string is not base45.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base45Error {
    /// A character outside the alphabet.
    #[error("invalid base45 character at offset {0}")]
    InvalidCharacter(usize),
    /// One character cannot end a string.
    #[error("invalid base45 length {0}")]
    InvalidLength(usize),
    /// A group encodes a value too large for its bytes.
    #[error("base45 group at offset {0} is out of range")]
    OutOfRange(usize),
}

/// Encodes bytes.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(2) * 3);
    let mut push = |mut n: u32, count: usize| {
        for _ in 0..count {
            out.push(ALPHABET[(n % 45) as usize] as char);
            n /= 45;
        }
    };
    for pair in bytes.chunks(2) {
        match pair {
            [a, b] => push(u32::from(*a) * 256 + u32::from(*b), 3),
            [a] => push(u32::from(*a), 2),
            _ => unreachable!("chunks(2) yields one or two bytes"),
        }
    }
    out
}

/// Each byte's value in the alphabet, or 0xff.
const VALUES: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

fn value(c: u8, offset: usize) -> Result<u32, Base45Error> {
    match VALUES[usize::from(c)] {
        0xff => Err(Base45Error::InvalidCharacter(offset)),
        v => Ok(u32::from(v)),
    }
}

/// Decodes a string, strictly: no character outside the alphabet, no out-of-range group.
pub fn decode(text: &str) -> Result<Vec<u8>, Base45Error> {
    let input = text.as_bytes();
    if input.len() % 3 == 1 {
        return Err(Base45Error::InvalidLength(input.len()));
    }
    let mut out = Vec::with_capacity(input.len() / 3 * 2 + 1);
    for (index, group) in input.chunks(3).enumerate() {
        let offset = index * 3;
        let mut n = 0u32;
        for (i, &c) in group.iter().enumerate().rev() {
            n = n * 45 + value(c, offset + i)?;
        }
        if group.len() == 3 {
            let n = u16::try_from(n).map_err(|_| Base45Error::OutOfRange(offset))?;
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(u8::try_from(n).map_err(|_| Base45Error::OutOfRange(offset))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_9285_examples() {
        assert_eq!(encode(b"AB"), "BB8");
        assert_eq!(encode(b"Hello!!"), "%69 VD92EX0");
        assert_eq!(encode(b"base-45"), "UJCLQE7W581");
        assert_eq!(decode("QED8WEX0").expect("valid"), b"ietf!");
        assert_eq!(decode("%69 VD92EX0").expect("valid"), b"Hello!!");
    }

    #[test]
    fn invalid_input_is_refused() {
        assert_eq!(decode("GGW"), Err(Base45Error::OutOfRange(0)));
        assert_eq!(decode("a"), Err(Base45Error::InvalidLength(1)));
        assert_eq!(decode("ab"), Err(Base45Error::InvalidCharacter(1)));
        assert_eq!(decode("ZZ"), Err(Base45Error::OutOfRange(0)));
    }

    #[test]
    fn round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&bytes)).expect("valid"), bytes);
    }
}
