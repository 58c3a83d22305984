//! The safetensors reader: any bytes give a tensor store or an error, never a panic, and every
//! accessor on an opened store is bounds-checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("model.safetensors", data);
    if let Ok(store) = affq::formats::safetensors::TensorStore::open(&[p]) {
        for name in store.names() {
            let _ = store.raw(&name);
            if let Ok(shape) = store.shape(&name) {
                if shape.iter().product::<usize>() <= 1 << 20 {
                    let _ = store.f32(&name, &shape);
                    let _ = store.i32s(&name, &shape);
                }
            }
        }
        let _ = store.metadata();
    }
});
