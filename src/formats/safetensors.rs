//! Reading Hugging Face checkpoints: a directory with `config.json` and `model.safetensors` (or a
//! sharded `model.safetensors.index.json`), or a single `.safetensors` file with `config.json`
//! beside it. Files are memory-mapped and validated up front; each tensor is converted to f32 when
//! it is asked for, so a caller can hold one block at a time.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where a model's files live.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

impl ModelFiles {
    /// Resolves a user-given model path (directory or `.safetensors` file).
    pub fn locate(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (dir, weights) = if meta.is_dir() {
            let index = path.join("model.safetensors.index.json");
            let single = path.join("model.safetensors");
            let weights = if index.exists() {
                shards_from_index(&index)?
            } else if single.exists() {
                vec![single]
            } else {
                return Err(Error::format(
                    path,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            };
            (path.to_path_buf(), weights)
        } else {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            (dir, vec![path.to_path_buf()])
        };
        let config = dir.join("config.json");
        if !config.exists() {
            return Err(Error::format(
                &config,
                "missing: a model needs config.json beside its weights",
            ));
        }
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.exists());
        Ok(ModelFiles {
            dir,
            config,
            weights,
            tokenizer,
        })
    }
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::format(index, "`weight_map` lists no files"));
    }
    let mut out = Vec::new();
    for f in files {
        if f.contains('/') || f.contains('\\') || f.starts_with("..") {
            return Err(Error::format(
                index,
                format!("shard name `{f}` is not a plain file name"),
            ));
        }
        let p = dir.join(&f);
        if !p.exists() {
            return Err(Error::format(
                index,
                format!("lists shard `{f}`, which is missing"),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

/// Memory-mapped safetensors files with a name → shard index.
pub struct TensorStore {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

/// Element type and shape of a stored tensor, plus its raw little-endian bytes.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl TensorStore {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is only read; affq never writes into its inputs. A concurrent
            // truncation by another process is outside what any mmap reader can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap[..]).map_err(|e| {
                let detail = match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                        "truncated or padded safetensors file: the header's tensors do not end \
                         at the end of the file ({} bytes)",
                        mmap.len()
                    ),
                    safetensors::SafeTensorError::HeaderTooSmall => {
                        "not a safetensors file: shorter than its 8-byte header length".into()
                    }
                    safetensors::SafeTensorError::InvalidHeaderLength => format!(
                        "truncated safetensors file: header length exceeds the file size ({} bytes)",
                        mmap.len()
                    ),
                    other => format!("invalid safetensors header: {other}"),
                };
                Error::format(path, detail)
            })?;
            let shard_id = shards.len();
            for name in meta.tensors().keys() {
                index.insert(name.clone(), shard_id);
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + n,
                meta,
            });
        }
        Ok(TensorStore { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// The file holding `name` (for error messages).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.shards[i].path.as_path())
    }

    pub fn first_path(&self) -> &Path {
        &self.shards[0].path
    }

    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for s in &self.shards {
            if let Some(m) = s.meta.metadata() {
                out.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        out
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(self.first_path(), format!("missing tensor `{name}`")))?;
        let s = &self.shards[i];
        let info = s.meta.info(name).expect("indexed name has metadata");
        let (b, e) = info.data_offsets;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: &s.mmap[s.data_start + b..s.data_start + e],
        })
    }

    /// Loads `name` as f32, checking its shape against `expected` (derived from config.json).
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let raw = self.raw(name)?;
        let path = self.path_of(name).unwrap_or(self.first_path());
        if raw.shape != expected {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has shape {:?} but config.json implies {:?}",
                    raw.shape, expected
                ),
            ));
        }
        let values = decode_f32(raw.dtype, raw.data).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; model weights must be F32, F16 or BF16",
                    raw.dtype
                ),
            )
        })?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has a non-finite value ({}) at element {i}",
                    values[i]
                ),
            ));
        }
        Ok(Tensor::from_vec(values, expected, &Device::Cpu)?)
    }
}

/// Decodes little-endian F32/F16/BF16 bytes to f32; `None` for other dtypes.
pub fn decode_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// A tensor ready to be written to safetensors.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn from_f32(t: &Tensor) -> Result<Self> {
        let v: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        Ok(StoredTensor {
            dtype: Dtype::F32,
            shape: t.dims().to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }

    pub fn f32(v: &[f32], shape: &[usize]) -> Self {
        StoredTensor {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn i32(v: &[i32], shape: &[usize]) -> Self {
        StoredTensor {
            dtype: Dtype::I32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn i64(v: &[i64], shape: &[usize]) -> Self {
        StoredTensor {
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl TensorStore {
    /// Raw integer tensor of the given dtype and shape (packed codes, zero points).
    pub fn i32s(&self, name: &str, expected: &[usize]) -> Result<Vec<i32>> {
        let raw = self.raw(name)?;
        let path = self.path_of(name).unwrap_or(self.first_path());
        if raw.dtype != Dtype::I32 || raw.shape != expected {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` is {:?} {:?}, expected I32 {:?}",
                    raw.dtype, raw.shape, expected
                ),
            ));
        }
        Ok(raw
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.raw(name)?.shape)
    }
}

/// Writes a safetensors file with tensors in the given order and `__metadata__` keys sorted, so
/// the same inputs always give the same bytes (the `safetensors` crate takes a `HashMap`, whose
/// order varies from run to run). The header is padded with spaces to a multiple of 8 bytes.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, StoredTensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Runtime(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        let expected = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        if expected != t.bytes.len() {
            return Err(Error::Runtime(format!(
                "tensor {name}: {} bytes for shape {:?} {:?}",
                t.bytes.len(),
                t.shape,
                t.dtype
            )));
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    // serde_json's Map is ordered by key (no `preserve_order`), so the header is canonical.
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Runtime(e.to_string()))?;
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, DiskLimit::new(f));
    let io = |e| Error::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for (_, t) in tensors {
        w.write_all(&t.bytes).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?
        .file
        .sync_all()
        .map_err(io)?;
    Ok(())
}

/// A file writer that fails like a full disk (ENOSPC) after `AFFQ_TEST_DISK_LIMIT` bytes when
/// that variable is set: the fault injection behind the full-disk tests.
struct DiskLimit {
    file: std::fs::File,
    left: Option<u64>,
}

impl DiskLimit {
    fn new(file: std::fs::File) -> Self {
        let left = std::env::var("AFFQ_TEST_DISK_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok());
        DiskLimit { file, left }
    }
}

impl std::io::Write for DiskLimit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(left) = &mut self.left {
            if *left < buf.len() as u64 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            *left -= buf.len() as u64;
        }
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
