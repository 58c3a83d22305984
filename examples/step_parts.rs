//! Times the forward and backward of each part of a FlatQuant training step at SmolLM2's shapes
//! (batch 4 × 512): which parts of candle's autograd cost what. Not a test; prints a table.
use affq::model::{Mode, ModelConfig, Rope};
use affq::quant::clipquant::clip_quant;
use affq::quant::quantizer::QuantSpec;
use affq::transforms::KroneckerTransform;
use candle_core::{Device, Tensor, Var, D};
use std::time::Instant;

fn rnd(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
}

fn time(name: &str, f: &dyn Fn() -> Tensor) {
    let (mut tf, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t0 = Instant::now();
        let y = f();
        let r = Tensor::ones_like(&y).unwrap();
        let loss = (y * r).unwrap().sum_all().unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t1 = Instant::now();
        let g = loss.backward().unwrap();
        drop(g);
        tf.push((t1 - t0).as_secs_f64() * 1e3);
        tb.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    tf.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    println!("{name:<28} fwd {:7.1} ms  bwd {:7.1} ms", tf[2], tb[2]);
}

fn main() {
    // As the affq binary: heap allocations below glibc's maximum mmap threshold, never trimmed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let (b, l, d, i, h, kv, hd) = (
        4usize, 512usize, 576usize, 1536usize, 9usize, 3usize, 64usize,
    );
    let g = h / kv;
    let x = rnd(&[b, l, d]);
    let wn = Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).unwrap();
    time("rms_norm_slow", &|| {
        candle_nn::ops::rms_norm_slow(x.as_tensor(), &wn, 1e-5).unwrap()
    });
    let q = rnd(&[b, h, l, hd]);
    let k = rnd(&[b, kv, l, hd]);
    let v = rnd(&[b, kv, l, hd]);
    let cfg = ModelConfig::from_file(std::path::Path::new(
        &std::env::args().nth(1).expect("config.json"),
    ))
    .unwrap();
    let rope = Rope::new(&cfg, l).unwrap();
    time("rope_slow q", &|| {
        rope.apply(q.as_tensor(), Mode::Train).unwrap()
    });
    let mask = {
        let mut m = vec![0f32; g * l * l];
        for (r, row) in m.chunks_exact_mut(l).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                if j > r % l {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (g * l, l), &Device::Cpu).unwrap()
    };
    time("attention composed", &|| {
        let qq = (q.as_tensor().reshape((b, kv, g * l, hd)).unwrap() * 0.125).unwrap();
        let s = qq.matmul(&k.as_tensor().t().unwrap()).unwrap();
        let s = s.broadcast_add(&mask).unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let o = p.matmul(v.as_tensor()).unwrap();
        o.reshape((b, h, l, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, l, h * hd))
            .unwrap()
    });
    time("attention per window", &|| {
        let outs: Vec<Tensor> = (0..b)
            .map(|w| {
                let qq = (q
                    .as_tensor()
                    .narrow(0, w, 1)
                    .unwrap()
                    .reshape((1, kv, g * l, hd))
                    .unwrap()
                    * 0.125)
                    .unwrap();
                let s = qq
                    .matmul(&k.as_tensor().narrow(0, w, 1).unwrap().t().unwrap())
                    .unwrap();
                let s = s.broadcast_add(&mask).unwrap();
                let m = s.max_keepdim(D::Minus1).unwrap().detach();
                let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
                p.matmul(&v.as_tensor().narrow(0, w, 1).unwrap()).unwrap()
            })
            .collect();
        let o = Tensor::cat(&outs, 0).unwrap();
        o.reshape((b, h, l, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, l, h * hd))
            .unwrap()
    });
    time("attention fused", &|| {
        affq::model::attention_op::causal_attention_train(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            0.125,
            None,
        )
        .unwrap()
    });
    let gt = rnd(&[b, l, i]);
    let ut = rnd(&[b, l, i]);
    time("silu(gate)*up", &|| {
        (candle_nn::ops::silu(gt.as_tensor()).unwrap() * ut.as_tensor()).unwrap()
    });
    let w = rnd(&[i, d]);
    time("baseline 576 (x*1)", &|| {
        x.as_tensor().affine(1.0, 0.0).unwrap()
    });
    time("baseline 1536 (x*1)", &|| {
        gt.as_tensor().affine(1.0, 0.0).unwrap()
    });
    time("linear 576->1536", &|| {
        affq::model::linear_forward(x.as_tensor(), w.as_tensor(), None).unwrap()
    });
    let w2 = rnd(&[d, i]);
    time("linear 1536->576", &|| {
        affq::model::linear_forward(gt.as_tensor(), w2.as_tensor(), None).unwrap()
    });
    let kt = |n1: usize, n2: usize, n: usize| KroneckerTransform {
        n1,
        n2,
        p1: Some(rnd(&[n1, n1]).as_tensor().clone()),
        p2: Some(rnd(&[n2, n2]).as_tensor().clone()),
        scale: Some(rnd(&[n]).as_tensor().clone()),
    };
    let t576 = kt(24, 24, d);
    time("kronecker 576", &|| t576.apply(x.as_tensor()).unwrap());
    let t1536 = kt(32, 48, i);
    time("kronecker 1536", &|| t1536.apply(gt.as_tensor()).unwrap());
    let kron2d = |t: &KroneckerTransform, x: &Tensor| -> Tensor {
        let dims = x.dims().to_vec();
        let n = t.n1 * t.n2;
        let rows = x.elem_count() / n;
        let y = x.broadcast_mul(t.scale.as_ref().unwrap()).unwrap();
        let y = y
            .reshape((rows * t.n1, t.n2))
            .unwrap()
            .matmul(t.p2.as_ref().unwrap())
            .unwrap();
        let y = y
            .reshape((rows, t.n1, t.n2))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let y = y
            .reshape((rows * t.n2, t.n1))
            .unwrap()
            .matmul(t.p1.as_ref().unwrap())
            .unwrap();
        y.reshape((rows, t.n2, t.n1))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(dims)
            .unwrap()
    };
    let t1536n = KroneckerTransform {
        scale: None,
        ..t1536.clone()
    };
    time("kronecker 1536 no scale", &|| {
        t1536n.apply(gt.as_tensor()).unwrap()
    });
    time("kronecker 576 2d", &|| kron2d(&t576, x.as_tensor()));
    time("kronecker 1536 2d", &|| kron2d(&t1536, gt.as_tensor()));
    let spec = QuantSpec::asym(4);
    let ah = rnd(&[1, 1]);
    let al = rnd(&[1, 1]);
    time("act clip_quant 576", &|| {
        clip_quant(
            &x.as_tensor().reshape((b * l, d)).unwrap(),
            ah.as_tensor(),
            al.as_tensor(),
            &spec,
            false,
        )
        .unwrap()
    });
    time("act clip_quant 1536", &|| {
        clip_quant(
            &gt.as_tensor().reshape((b * l, i)).unwrap(),
            ah.as_tensor(),
            al.as_tensor(),
            &spec,
            false,
        )
        .unwrap()
    });
    time("residual add", &|| {
        (x.as_tensor() + gt.as_tensor().narrow(2, 0, d).unwrap()).unwrap()
    });
}
