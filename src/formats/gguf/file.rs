//! Reading GGUF files (v2/v3, formats.md §3): metadata, tensor directory, tensor data.
//!
//! The header parser is affq's own, bounds-checked against the file size so that a corrupt file
//! gives an error naming it rather than a huge allocation or a panic. Block decoding of quantized
//! types is delegated to candle's GGML kernels.

use crate::error::{Error, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The element types affq can decode, with GGML's ids.
const TYPES: &[(u32, &str, GgmlDType)] = &[
    (0, "F32", GgmlDType::F32),
    (1, "F16", GgmlDType::F16),
    (2, "Q4_0", GgmlDType::Q4_0),
    (3, "Q4_1", GgmlDType::Q4_1),
    (6, "Q5_0", GgmlDType::Q5_0),
    (7, "Q5_1", GgmlDType::Q5_1),
    (8, "Q8_0", GgmlDType::Q8_0),
    (10, "Q2_K", GgmlDType::Q2K),
    (11, "Q3_K", GgmlDType::Q3K),
    (12, "Q4_K", GgmlDType::Q4K),
    (13, "Q5_K", GgmlDType::Q5K),
    (14, "Q6_K", GgmlDType::Q6K),
    (30, "BF16", GgmlDType::BF16),
];

pub(super) fn type_name(id: u32) -> String {
    TYPES
        .iter()
        .find(|t| t.0 == id)
        .map(|t| t.1.to_string())
        .unwrap_or_else(|| format!("type {id}"))
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (outermost first): GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Absolute byte offset in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// The tensor in slices of at most 4 096 rows when it is 2-D (the f32 copy of a 152k-row
    /// vocabulary is 0.5 GB), else whole: what a reader dequantizes one at a time.
    pub fn row_slices(&self) -> Vec<TensorInfo> {
        const ROWS: usize = 4096;
        if self.shape.len() != 2 {
            return vec![self.clone()];
        }
        (0..self.shape[0])
            .step_by(ROWS)
            .map(|r| self.rows(r, ROWS.min(self.shape[0] - r)))
            .collect()
    }

    /// Rows `r0..r0 + n` of a 2-D tensor (quantization blocks never straddle rows).
    pub fn rows(&self, r0: usize, n: usize) -> TensorInfo {
        let row_bytes = self.len / self.shape[0].max(1);
        let mut shape = self.shape.clone();
        shape[0] = n;
        TensorInfo {
            name: self.name.clone(),
            shape,
            ggml_type: self.ggml_type,
            start: self.start + r0 * row_bytes,
            len: n * row_bytes,
        }
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!(
                        "truncated GGUF header: {what} at byte {} needs {n} bytes, file has {}",
                        self.pos,
                        self.buf.len()
                    ),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A count of items, each at least `min_size` bytes, that must fit in the rest of the file.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let remaining = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > remaining {
            return Err(Error::format(
                self.path,
                format!("truncated or corrupt GGUF header: {what} = {n} cannot fit in the remaining {remaining} bytes"),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("GGUF {what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let w = "metadata value";
        Ok(match ty {
            0 => Value::U8(self.take(1, w)?[0]),
            1 => Value::I8(self.take(1, w)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            4 => Value::U32(self.u32(w)?),
            5 => Value::I32(self.u32(w)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(w)?)),
            7 => Value::Bool(self.take(1, w)?[0] != 0),
            8 => Value::String(self.string("metadata string")?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(self.path, "GGUF arrays nested too deeply"));
                }
                let et = self.u32("array type")?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(min, "array length")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(w)?),
            11 => Value::I64(self.u64(w)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(w)?)),
            other => {
                return Err(Error::format(
                    self.path,
                    format!("unknown GGUF metadata value type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of an input file.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors) = Self::parse(path, &mmap)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse(path: &Path, buf: &[u8]) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
        let mut c = Cursor { buf, pos: 0, path };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!(
                    "not a GGUF file (magic {:?}, expected \"GGUF\")",
                    String::from_utf8_lossy(magic)
                ),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("unsupported GGUF version {version} (2 and 3 are supported)"),
            ));
        }
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(12, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor n_dims")? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions (1..4 allowed)"),
                ));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64("tensor dim")?);
            }
            let ty = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, ne, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(Error::format(
                        path,
                        "general.alignment must be a power of two",
                    ))
                }
            },
        };
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        for (name, ne, ty, offset) in raw {
            let Some(&(_, _, dt)) = TYPES.iter().find(|t| t.0 == ty) else {
                let names: Vec<&str> = TYPES.iter().map(|t| t.1).collect();
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has unsupported GGML type {} (supported: {})",
                        type_name(ty),
                        names.join(", ")
                    ),
                ));
            };
            let elems = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e < 1 << 40);
            let Some(elems) = elems else {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has absurd dimensions {ne:?}"),
                ));
            };
            let bs = dt.block_size() as u64;
            if ne[0] % bs != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: row length {} is not a multiple of the {} block size {bs}", ne[0], type_name(ty)),
                ));
            }
            let len = (elems / bs) as usize * dt.type_size();
            let start = (data_start as u64).checked_add(offset).map(|s| s as usize);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= buf.len() => {
                    let shape = ne.iter().rev().map(|&d| d as usize).collect();
                    tensors.push(TensorInfo {
                        name,
                        shape,
                        ggml_type: ty,
                        start: s,
                        len,
                    });
                    let _ = e;
                }
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                        "truncated tensor data: `{name}` needs bytes {}..{} but the file has {}",
                        data_start as u64 + offset,
                        data_start as u64 + offset + len as u64,
                        buf.len()
                    ),
                    ))
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Decodes a tensor to f32 values in PyTorch row-major order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let bytes = &self.mmap[t.start..t.start + t.len];
        let &(_, _, dt) = TYPES
            .iter()
            .find(|x| x.0 == t.ggml_type)
            .expect("checked at parse");
        let out = match dt {
            GgmlDType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            GgmlDType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            GgmlDType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                // candle reinterprets the bytes as block structs: give it an owned, aligned copy.
                let owned = bytes.to_vec();
                let q = qtensor_from_ggml(dt, &owned, t.shape.clone(), &Device::Cpu)
                    .map_err(|e| Error::format(&self.path, format!("tensor `{}`: {e}", t.name)))?;
                q.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            }
        };
        // SAFETY: a read-only shared file mapping; MADV_DONTNEED only drops this process's view
        // of pages already decoded (they count in the resident set otherwise), a later read maps
        // the same contents again.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, t.start, t.len)
        };
        Ok(out)
    }

    pub(super) fn meta_u64(&self, key: &str) -> Result<u64> {
        self.get(key).and_then(Value::as_u64).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("missing or non-integer metadata `{key}`"),
            )
        })
    }
}
