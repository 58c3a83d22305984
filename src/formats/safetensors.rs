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

    /// `name`'s raw tensor and file, its shape checked against `expected` (from config.json).
    fn raw_of_shape(&self, name: &str, expected: &[usize]) -> Result<(RawTensor<'_>, &Path)> {
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
        Ok((raw, path))
    }

    /// Loads `name` as f32, checking its shape against `expected` (derived from config.json).
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let (raw, path) = self.raw_of_shape(name, expected)?;
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
        self.release(name);
        Ok(Tensor::from_vec(values, expected, &Device::Cpu)?)
    }

    /// Loads `name` in its stored dtype when that is F16 or BF16 (else as f32), checking its
    /// shape: 16-bit weights stay 16-bit in memory and are widened where they are used.
    pub fn weight(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let (raw, path) = self.raw_of_shape(name, expected)?;
        let dtype = match raw.dtype {
            Dtype::F16 => candle_core::DType::F16,
            Dtype::BF16 => candle_core::DType::BF16,
            _ => return self.f32(name, expected),
        };
        let finite = |c: &[u8]| {
            let b = u16::from_le_bytes([c[0], c[1]]);
            match raw.dtype {
                Dtype::F16 => half::f16::from_bits(b).is_finite(),
                _ => half::bf16::from_bits(b).is_finite(),
            }
        };
        if let Some(i) = raw.data.chunks_exact(2).position(|c| !finite(c)) {
            let v = decode_f32(raw.dtype, &raw.data[2 * i..2 * i + 2]).unwrap_or_default();
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has a non-finite value ({}) at element {i}",
                    v.first().copied().unwrap_or(f32::NAN)
                ),
            ));
        }
        let t = Tensor::from_raw_buffer(raw.data, dtype, expected, &Device::Cpu)?;
        self.release(name);
        Ok(t)
    }

    /// Drops this process's mapping of `name`'s pages once they have been decoded into owned
    /// memory: mapped file pages count in the resident set, and a model read block by block would
    /// otherwise end with the whole file resident. The pages stay in the page cache; a later read
    /// maps them again.
    pub fn release(&self, name: &str) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let s = &self.shards[i];
        if let Some(info) = s.meta.info(name) {
            let (b, e) = info.data_offsets;
            // SAFETY: a read-only shared file mapping; MADV_DONTNEED only unmaps its pages, and a
            // later access reads the same file contents again. A failure only keeps them resident.
            let _ = unsafe {
                s.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    s.data_start + b,
                    e - b,
                )
            };
        }
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
    /// `t` as F32 bytes, read in place (no intermediate `Vec<f32>`: a vocabulary matrix is
    /// 0.5 GB per copy).
    pub fn from_f32(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let bytes = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
                v[a..b].iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            _ => {
                drop(storage);
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        };
        Ok(StoredTensor {
            dtype: Dtype::F32,
            shape: t.dims().to_vec(),
            bytes,
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

    pub fn i8(v: &[i8], shape: &[usize]) -> Self {
        StoredTensor {
            dtype: Dtype::I8,
            shape: shape.to_vec(),
            bytes: v.iter().map(|x| *x as u8).collect(),
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
        let v = raw
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.release(name);
        Ok(v)
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
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        check_size(name, t)?;
        entries.push((name.as_str(), t.dtype, t.shape.as_slice(), t.bytes.len()));
    }
    let h = header(&entries, metadata)?;
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, DiskLimit::new(f));
    let io = |e| Error::io(path, e);
    w.write_all(&h).map_err(io)?;
    for (_, t) in tensors {
        w.write_all(&t.bytes).map_err(io)?;
    }
    finish_file(w, path)
}

fn check_size(name: &str, t: &StoredTensor) -> Result<()> {
    let expected = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
    if expected != t.bytes.len() {
        return Err(Error::Runtime(format!(
            "tensor {name}: {} bytes for shape {:?} {:?}",
            t.bytes.len(),
            t.shape,
            t.dtype
        )));
    }
    Ok(())
}

/// The 8-byte length and the JSON header for tensors laid out back to back in `entries` order
/// (name, dtype, shape, bytes).
fn header(
    entries: &[(&str, Dtype, &[usize], usize)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|e| Error::Runtime(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for &(name, dtype, shape, len) in entries {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    // serde_json's Map is ordered by key (no `preserve_order`), so the header is canonical.
    let mut h = serde_json::to_vec(&header).map_err(|e| Error::Runtime(e.to_string()))?;
    while (8 + h.len()) % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    Ok(out)
}

fn finish_file(w: std::io::BufWriter<DiskLimit>, path: &Path) -> Result<()> {
    w.into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?
        .file
        .sync_all()
        .map_err(|e| Error::io(path, e))
}

/// A safetensors file written a few tensors at a time, so no more than one block's tensors are in
/// memory: tensors are appended to a spool file as they come; [`Self::finish`] writes the header
/// and copies the data in name order. The result is byte for byte what [`write_safetensors`]
/// writes for the same tensors sorted by name. Disk: the spool and the file (twice the output)
/// until the spool is removed.
pub struct SpooledSafetensors {
    path: PathBuf,
    spool_path: PathBuf,
    spool: std::io::BufWriter<DiskLimit>,
    /// name → (dtype, shape, offset in the spool, bytes).
    entries: BTreeMap<String, (Dtype, Vec<usize>, u64, usize)>,
    len: u64,
}

impl SpooledSafetensors {
    pub fn create(path: &Path) -> Result<Self> {
        let mut spool_path = path.as_os_str().to_owned();
        spool_path.push(".spool");
        let spool_path = PathBuf::from(spool_path);
        let f = std::fs::File::create(&spool_path).map_err(|e| Error::io(&spool_path, e))?;
        Ok(SpooledSafetensors {
            path: path.to_path_buf(),
            spool_path,
            spool: std::io::BufWriter::with_capacity(1 << 20, DiskLimit::new(f)),
            entries: BTreeMap::new(),
            len: 0,
        })
    }

    pub fn add(&mut self, tensors: Vec<(String, StoredTensor)>) -> Result<()> {
        use std::io::Write;
        for (name, t) in tensors {
            check_size(&name, &t)?;
            if self.entries.contains_key(&name) {
                return Err(Error::Runtime(format!("tensor {name} written twice")));
            }
            self.spool
                .write_all(&t.bytes)
                .map_err(|e| Error::io(&self.spool_path, e))?;
            self.entries
                .insert(name, (t.dtype, t.shape, self.len, t.bytes.len()));
            self.len += t.bytes.len() as u64;
        }
        Ok(())
    }

    pub fn finish(self, metadata: &BTreeMap<String, String>) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let SpooledSafetensors {
            path,
            spool_path,
            spool,
            entries,
            ..
        } = self;
        spool
            .into_inner()
            .map_err(|e| Error::io(&spool_path, e.into_error()))?
            .file
            .flush()
            .map_err(|e| Error::io(&spool_path, e))?;
        let list: Vec<(&str, Dtype, &[usize], usize)> = entries
            .iter()
            .map(|(n, (d, s, _, l))| (n.as_str(), *d, s.as_slice(), *l))
            .collect();
        let h = header(&list, metadata)?;
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, DiskLimit::new(f));
        let io = |e| Error::io(&path, e);
        w.write_all(&h).map_err(io)?;
        let mut src = std::fs::File::open(&spool_path).map_err(|e| Error::io(&spool_path, e))?;
        let mut buf = vec![0u8; 1 << 22];
        for (_, _, off, len) in entries.values() {
            src.seek(SeekFrom::Start(*off))
                .map_err(|e| Error::io(&spool_path, e))?;
            let mut left = *len;
            while left > 0 {
                let n = left.min(buf.len());
                src.read_exact(&mut buf[..n])
                    .map_err(|e| Error::io(&spool_path, e))?;
                w.write_all(&buf[..n]).map_err(io)?;
                left -= n;
            }
        }
        finish_file(w, &path)?;
        std::fs::remove_file(&spool_path).map_err(|e| Error::io(&spool_path, e))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_file_is_the_sorted_write_byte_for_byte() {
        // Tensors added out of name order, a few at a time: the same bytes as one sorted write,
        // and readable back with every value in place.
        let dir = tempfile::tempdir().unwrap();
        let t = |n: usize, k: f32| {
            StoredTensor::f32(&(0..n).map(|i| i as f32 * k).collect::<Vec<_>>(), &[n])
        };
        let tensors = vec![
            ("model.layers.10.w".to_string(), t(5, 1.0)),
            ("model.layers.2.w".to_string(), t(3, 2.0)),
            ("a".to_string(), StoredTensor::i32(&[7, -1], &[2])),
            ("model.norm.weight".to_string(), t(4, 0.5)),
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut sorted = tensors.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let whole = dir.path().join("whole.safetensors");
        write_safetensors(&whole, &sorted, &meta).unwrap();
        let spooled = dir.path().join("spooled.safetensors");
        let mut s = SpooledSafetensors::create(&spooled).unwrap();
        s.add(tensors[..2].to_vec()).unwrap();
        s.add(tensors[2..].to_vec()).unwrap();
        assert!(s.add(vec![tensors[0].clone()]).is_err(), "a name twice");
        s.finish(&meta).unwrap();
        assert_eq!(
            std::fs::read(&whole).unwrap(),
            std::fs::read(&spooled).unwrap()
        );
        assert!(!dir.path().join("spooled.safetensors.spool").exists());
        let store = TensorStore::open(&[spooled]).unwrap();
        let v: Vec<f32> = store
            .f32("model.layers.10.w", &[5])
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }
}
