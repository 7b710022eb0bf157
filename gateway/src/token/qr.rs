//! Drawing a token as a QR code: in a terminal, or as a PNG image.

use std::path::Path;

use qrcodegen::{QrCode, QrCodeEcc};

/// Quiet zone around the code, in modules (ISO/IEC 18004 asks for 4).
const QUIET: i32 = 4;

/// Encodes text at error correction level M, the level QR payloads of this kind use.
pub fn encode(text: &str) -> Result<QrCode, String> {
    QrCode::encode_text(text, QrCodeEcc::Medium).map_err(|e| format!("does not fit a QR code: {e:?}"))
}

/// Draws the code with Unicode half blocks, two modules per character cell, dark on light.
pub fn to_terminal(code: &QrCode) -> String {
    let size = code.size();
    let dark = |x: i32, y: i32| (0..size).contains(&x) && (0..size).contains(&y) && code.get_module(x, y);
    let mut out = String::new();
    for y in (-QUIET..size + QUIET).step_by(2) {
        for x in -QUIET..size + QUIET {
            out.push(match (dark(x, y), dark(x, y + 1)) {
                (false, false) => '█',
                (true, false) => '▄',
                (false, true) => '▀',
                (true, true) => ' ',
            });
        }
        out.push('\n');
    }
    out
}

/// Writes the code as a greyscale PNG, `scale` pixels per module.
pub fn write_png(code: &QrCode, scale: u32, path: &Path) -> Result<(), String> {
    let modules = (code.size() + 2 * QUIET) as u32;
    let side = modules * scale;
    let mut pixels = vec![255u8; (side * side) as usize];
    for y in 0..side {
        for x in 0..side {
            let (mx, my) = ((x / scale) as i32 - QUIET, (y / scale) as i32 - QUIET);
            if code.get_module(mx, my) {
                pixels[(y * side + x) as usize] = 0;
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&pixels).map_err(|e| e.to_string())
}
