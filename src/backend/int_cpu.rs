//! The integer CPU backend: quantized linears whose weights (per channel, integer zero point) and
//! activation grid have a kernel run as per-token activation quantization + the integer GEMM of
//! `kernels::int_gemm`; per site, the online transform and the quantization are fused
//! (`kernels::transform_quant`) and shared by the site's linears ([`IntSiteKernel`]).

use crate::error::Result;
use crate::kernels::int_gemm::{self, gemm_into, Isa, PackedWeights};
use crate::kernels::transform_quant::{quantize_rows, FusedTransform};
use crate::model::{Block, LinearKind, LinearLayer, Model, Site, SiteKernel};
use crate::quant::{ActQuantizer, QuantSpec, QuantizedWeight};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, OnceLock};

/// A quantized linear evaluated with integer kernels. Holds the codes and the packed weights; the
/// dense (dequantized) weight is only made when asked for, so an evaluated model holds no f32
/// copy of its quantized weights.
pub struct IntLinear {
    qweight: QuantizedWeight,
    dense: OnceLock<Tensor>,
    bias_t: Option<Tensor>,
    act_q: Arc<dyn ActQuantizer>,
    packed: PackedWeights,
    act: QuantSpec,
    bias: Option<Vec<f32>>,
    isa: Isa,
}

impl IntLinear {
    /// The integer form of `layer` if its weights and activation grid have a kernel.
    pub fn from_layer(layer: &dyn LinearLayer, isa: Isa) -> Result<Option<Self>> {
        let (Some(qw), Some(act)) = (layer.quantized_weight(), layer.act_quantizer()) else {
            return Ok(None);
        };
        let spec = act.spec()?;
        if !int_gemm::act_supported(&spec) {
            return Ok(None);
        }
        let Some(packed) = PackedWeights::from_quantized(qw) else {
            return Ok(None);
        };
        let bias = layer
            .bias()
            .map(|b| b.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        Ok(Some(IntLinear {
            qweight: qw.clone(),
            dense: OnceLock::new(),
            bias_t: layer.bias().map(Tensor::detach),
            act_q: act,
            packed,
            act: spec,
            bias,
            isa,
        }))
    }

    pub fn act_spec(&self) -> QuantSpec {
        self.act
    }

    /// The packed weight codes and their scales.
    pub fn packed(&self) -> &PackedWeights {
        &self.packed
    }

    pub fn bias_values(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
}

/// The integer path of one site as a candle op ([`Tensor::apply_op1_no_bwd`]): `x [.., k]` is
/// transformed (when the site has a transform) and quantized once, then each linear's integer
/// GEMM writes its own columns of `[.., Σ nᵢ]` (q|k|v or gate|up side by side; one linear: its
/// plain output). The linears share one activation grid. No gradient: inference only.
pub struct IntSiteOp<'a> {
    pub transform: Option<&'a FusedTransform>,
    pub linears: &'a [&'a IntLinear],
}

impl IntSiteOp<'_> {
    /// `x` through the site; `x` is made contiguous first if it is not.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
    }
}

impl CustomOp1 for IntSiteOp<'_> {
    fn name(&self) -> &'static str {
        "affq-int-site"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((lo, hi))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("affq-int-site: expects a contiguous f32 input")
        };
        let Some(first) = self.linears.first() else {
            candle_core::bail!("affq-int-site: no linear")
        };
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let m = (hi - lo).checked_div(k).unwrap_or(0);
        let acts = quantize_rows(&v[lo..hi], m, k, self.transform, &first.act);
        let total: usize = self.linears.iter().map(|l| l.packed.n).sum();
        let mut out = vec![0f32; m * total];
        let mut col = 0;
        for l in self.linears.iter().filter(|_| m > 0) {
            gemm_into(
                &acts,
                &l.packed,
                l.bias.as_deref(),
                l.isa,
                &mut out[col..],
                total,
            )
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            col += l.packed.n;
        }
        let mut shape = dims[..dims.len().saturating_sub(1)].to_vec();
        shape.push(total);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

impl LinearLayer for IntLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        IntSiteOp {
            transform: None,
            linears: &[self],
        }
        .forward(x)
    }
    fn weight_ref(&self) -> &Tensor {
        self.dense.get_or_init(|| {
            let q = &self.qweight;
            Tensor::from_vec(q.dequantize(), (q.out, q.inp), &candle_core::Device::Cpu)
                .expect("dequantized weight has its shape")
        })
    }
    fn in_features(&self) -> usize {
        self.qweight.inp
    }
    fn out_features(&self) -> usize {
        self.qweight.out
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias_t.as_ref()
    }
    fn act_quantizer(&self) -> Option<Arc<dyn ActQuantizer>> {
        Some(self.act_q.clone())
    }
    fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        Some(&self.qweight)
    }
    fn detached(&self) -> Box<dyn LinearLayer> {
        Box::new(IntLinear {
            qweight: self.qweight.clone(),
            dense: self.dense.clone(),
            bias_t: self.bias_t.clone(),
            act_q: self.act_q.clone(),
            packed: self.packed.clone(),
            act: self.act,
            bias: self.bias.clone(),
            isa: self.isa,
        })
    }
}

/// A site on the integer kernels: its transform (if any) fused with the quantization, then each
/// linear's GEMM into its own columns.
pub struct IntSiteKernel {
    transform: Option<Arc<FusedTransform>>,
    linears: Vec<Arc<IntLinear>>,
}

impl SiteKernel for IntSiteKernel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let linears: Vec<&IntLinear> = self.linears.iter().map(|l| l.as_ref()).collect();
        IntSiteOp {
            transform: self.transform.as_deref(),
            linears: &linears,
        }
        .forward(x)
    }
}

/// Replaces every quantized linear of `b` whose scheme has an integer kernel by its
/// integer-kernel form and installs a fused kernel at every site whose linears all converted with
/// one activation grid (each site's transform in bf16 with `bf16_transforms` where the CPU can),
/// as the model is loaded, block by block. Returns how many layers were converted and how many
/// transforms run in bf16.
pub fn use_int_kernels_block(
    b: &mut Block,
    isa: Isa,
    bf16_transforms: bool,
) -> Result<(usize, usize)> {
    let (mut n, mut bf16) = (0, 0);
    let mut ints: Vec<Option<Arc<IntLinear>>> = vec![None; LinearKind::ALL.len()];
    for (slot, kind) in ints.iter_mut().zip(LinearKind::ALL) {
        if let Some(l) = IntLinear::from_layer(b.linear(kind), isa)? {
            let l = Arc::new(l);
            b.set_linear_shared(kind, l.clone())?;
            *slot = Some(l);
            n += 1;
        }
    }
    for site in Site::ALL {
        let transform = match b.site(site) {
            Some(t) => {
                let mut f = FusedTransform::new(t)?;
                if bf16_transforms {
                    f = f.with_bf16();
                    bf16 += f.is_bf16() as usize;
                }
                Some(Arc::new(f))
            }
            None => None,
        };
        let linears: Option<Vec<Arc<IntLinear>>> = site
            .linears()
            .iter()
            .map(|k| ints[k.index()].clone())
            .collect();
        if let Some(linears) = linears {
            if linears.iter().all(|l| l.act == linears[0].act) {
                b.set_site_kernel(site, Some(Arc::new(IntSiteKernel { transform, linears })));
            }
        }
    }
    Ok((n, bf16))
}

/// The head on the integer kernels when it is quantized with a kernel's scheme.
pub fn use_int_kernels_head(model: &mut Model, isa: Isa) -> Result<bool> {
    if let Some(l) = IntLinear::from_layer(model.head.as_ref(), isa)? {
        model.head = Box::new(l);
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::simulated::QuantLinear;
    use crate::quant::QuantSpec;
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn site_op_puts_each_linear_in_its_own_columns() {
        // One quantization shared by two linears of different widths (q|k-like, ragged n and k):
        // the op's output is exactly each linear's own output side by side, also for an input
        // that is not contiguous and for no rows at all.
        let mut rng = Rng::new(9);
        let (k, m) = (40usize, 5usize);
        let mut layer = |n: usize, bits: u8| -> IntLinear {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let qw = crate::quant::QuantizedWeight::quantize(
                "t",
                &w,
                n,
                k,
                QuantSpec::sym(bits),
                crate::quant::Granularity::Channel,
                false,
            )
            .unwrap();
            let dense = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let bias = Tensor::from_vec(vec![0.25f32; n], n, &Device::Cpu).unwrap();
            let q = QuantLinear::new(Some(qw), dense, Some(bias), Some(QuantSpec::sym(4))).unwrap();
            IntLinear::from_layer(&q, Isa::detect()).unwrap().unwrap()
        };
        let (a, b) = (layer(19, 4), layer(8, 8));
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        // [k, m] transposed to a non-contiguous [m, k] view.
        let xt = Tensor::from_vec(x, (k, m), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt.is_contiguous());
        let op = IntSiteOp {
            transform: None,
            linears: &[&a, &b],
        };
        let both: Vec<Vec<f32>> = op.forward(&xt).unwrap().to_vec2().unwrap();
        let ya: Vec<Vec<f32>> = a.forward(&xt).unwrap().to_vec2().unwrap();
        let yb: Vec<Vec<f32>> = b.forward(&xt).unwrap().to_vec2().unwrap();
        for r in 0..m {
            assert_eq!(both[r], [ya[r].clone(), yb[r].clone()].concat(), "row {r}");
        }
        let empty = Tensor::zeros((0, k), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(op.forward(&empty).unwrap().dims(), &[0, 27]);
    }
}
