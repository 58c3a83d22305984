//! Writing GGUF v3 (formats.md §3.1), streamed: the header and tensor directory first (every
//! tensor's size follows from its shape and type), then each tensor's bytes in directory order,
//! so an export holds one tensor in memory at a time. candle's `gguf_file::write` needs every
//! tensor in memory at once and writes v2, hence this small writer; it is checked against
//! llama.cpp's own Python reader (`gguf` on PyPI) in tests/it/export.rs.

use super::blocks::GgmlType;
use super::file::Value;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Data alignment (`general.alignment` is not written: readers default to 32).
pub const ALIGNMENT: usize = 32;

/// One entry of the tensor directory: PyTorch shape (outermost first; written reversed, as
/// GGUF's `ne` is innermost first).
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorEntry {
    pub fn bytes(&self) -> usize {
        let inner = *self.shape.last().unwrap_or(&1);
        let rows: usize = self.shape.iter().rev().skip(1).product();
        rows * self.ty.row_bytes(inner)
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::Array(a) => {
            let t = a.first().map_or(value_type(&Value::U8(0)), value_type);
            if a.iter()
                .any(|x| value_type(x) != t || matches!(x, Value::Array(_)))
            {
                return Err("an array must hold values of one scalar type".into());
            }
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(buf, x)?;
            }
        }
    }
    Ok(())
}

/// A GGUF file being written: [`Self::create`] writes the header, [`Self::write`] each tensor in
/// directory order, [`Self::finish`] checks that all were written and flushes.
pub struct GgufWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    entries: Vec<TensorEntry>,
    next: usize,
}

impl GgufWriter {
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        entries: Vec<TensorEntry>,
    ) -> Result<Self> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut h, k);
            h.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut h, v)
                .map_err(|e| Error::Runtime(format!("GGUF metadata `{k}`: {e}")))?;
        }
        let mut offset = 0usize;
        for e in &entries {
            put_str(&mut h, &e.name);
            h.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
            for &d in e.shape.iter().rev() {
                h.extend_from_slice(&(d as u64).to_le_bytes());
            }
            h.extend_from_slice(&e.ty.id().to_le_bytes());
            h.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += e.bytes().next_multiple_of(ALIGNMENT);
        }
        h.resize(h.len().next_multiple_of(ALIGNMENT), 0);
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, f);
        file.write_all(&h).map_err(|e| Error::io(path, e))?;
        Ok(GgufWriter {
            path: path.to_path_buf(),
            file,
            entries,
            next: 0,
        })
    }

    /// Writes the next tensor's data (`name` must be the next entry, `data` its exact size).
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let e = self.entries.get(self.next).ok_or_else(|| {
            Error::Runtime(format!(
                "GGUF writer: `{name}` is not in the tensor directory"
            ))
        })?;
        if e.name != name || e.bytes() != data.len() {
            return Err(Error::Runtime(format!(
                "GGUF writer: expected `{}` ({} bytes), got `{name}` ({} bytes)",
                e.name,
                e.bytes(),
                data.len()
            )));
        }
        let pad = data.len().next_multiple_of(ALIGNMENT) - data.len();
        self.file
            .write_all(data)
            .and_then(|_| self.file.write_all(&[0u8; ALIGNMENT][..pad]))
            .map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if let Some(e) = self.entries.get(self.next) {
            return Err(Error::Runtime(format!(
                "GGUF writer: tensor `{}` was never written",
                e.name
            )));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    /// What the writer writes, affq's reader reads back: metadata of every type, shapes (reversed
    /// on disk), offsets and data.
    #[test]
    fn round_trip_through_the_reader() {
        let dir = std::env::temp_dir().join(format!("affq-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f32".to_string(), Value::F32(0.5)),
            ("a.bool".to_string(), Value::Bool(true)),
            (
                "a.arr".to_string(),
                Value::Array(vec![Value::String("x".into()), Value::String("y z".into())]),
            ),
            (
                "a.ints".to_string(),
                Value::Array(vec![Value::I32(-1), Value::I32(3)]),
            ),
        ];
        let entries = vec![
            TensorEntry {
                name: "a".into(),
                shape: vec![3, 5],
                ty: GgmlType::F32,
            },
            TensorEntry {
                name: "b".into(),
                shape: vec![2, 32],
                ty: GgmlType::F16,
            },
        ];
        let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..64).map(|i| i as f32 - 10.0).collect();
        let mut w = GgufWriter::create(&path, &meta, entries).unwrap();
        w.write("a", &super::super::blocks::f32_bytes(&a)).unwrap();
        assert!(w.write("x", &[0u8; 4]).is_err());
        w.write("b", &super::super::blocks::f16_bytes(&b)).unwrap();
        w.finish().unwrap();
        let g = GgufFile::open(&path).unwrap();
        for (k, v) in &meta {
            assert_eq!(g.get(k), Some(v), "{k}");
        }
        let ta = g.tensor("a").unwrap();
        assert_eq!(ta.shape, vec![3, 5]);
        assert_eq!(g.dequantize(ta).unwrap(), a);
        assert_eq!(g.dequantize(g.tensor("b").unwrap()).unwrap(), b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
