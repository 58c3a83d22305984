//! The GGUF reader: header, metadata and tensor table parsing and dequantization of every tensor.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("model.gguf", data);
    if let Ok(g) = affq::formats::gguf::GgufFile::open(&p) {
        for t in g.tensors.clone() {
            let _ = g.dequantize(&t);
        }
    }
});
