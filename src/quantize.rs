//! Running a validated [`QuantizePlan`]: open the model, the method's whole-model step, the
//! block-by-block calibration (when the plan needs it) or plain round-to-nearest, and the
//! crash-safe checkpoint write. What happens is reported through [`Progress`], so the binary
//! decides how it is shown.

use crate::calib::data::CalibSource;
use crate::calib::resume::WorkDir;
use crate::calib::{self, BlockFlow, BlockReport, BlockStore, EngineConfig, WeightQuantizer};
use crate::data;
use crate::error::{Error, Result};
use crate::formats::checkpoint::{self, Checkpoint, QuantConfig};
use crate::formats::checkpoint::{CheckpointWriter, Precision};
use crate::methods::plan::{quantize_block, quantize_head};
use crate::methods::{EpochLog, Method, MethodInput};
use crate::model::{Block, Model, ModelConfig};
use crate::plan::QuantizePlan;
use candle_core::Tensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The calibration's blocks read one at a time from the source checkpoint and written to the
/// output as they are finished: a quantization holds one block's weights.
struct Streamed<'a> {
    ckpt: &'a Checkpoint,
    config: Arc<ModelConfig>,
    writer: &'a mut CheckpointWriter,
}

impl BlockFlow for Streamed<'_> {
    fn num_blocks(&self) -> usize {
        self.config.num_layers
    }
    fn take(&mut self, i: usize) -> Result<Block> {
        self.ckpt.load_block(self.config.clone(), i, Precision::F32)
    }
    fn put(&mut self, block: Block) -> Result<()> {
        self.writer.add_block(&block)
    }
}

/// Observer of a quantization run.
pub trait Progress {
    /// A resumed run found blocks `0..n` finished.
    fn resumed(&mut self, _n: usize) {}
    /// The calibration starts over `blocks` blocks; `summary` describes data and training.
    fn calibration_started(&mut self, _summary: &str, _blocks: usize) {}
    fn epoch(&mut self, _block: usize, _log: &EpochLog) {}
    /// Block `report.block` is finished (`done` of `total`); `label` names the method.
    fn block_done(&mut self, _done: usize, _total: usize, _report: &BlockReport, _label: &str) {}
    fn calibration_finished(&mut self) {}
    /// Something the user should know (numerical trouble the method handled).
    fn warning(&mut self, _msg: &str) {}
    /// A choice made for the user (e.g. the recipe picked for the scheme).
    fn info(&mut self, _msg: &str) {}
}

/// A run that shows nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// What a finished run wrote.
pub struct QuantizeOutcome {
    pub config: QuantConfig,
    /// The checkpoint's notes, one line each (also in `quantization_config.transforms`).
    pub transforms: Vec<String>,
}

/// Calibration data of the plan, tokenized into windows; and its description.
fn calibration_tokens(p: &QuantizePlan, ckpt: &Checkpoint) -> Result<(Tensor, String)> {
    let dir = data::data_dir(p.request.data_dir.as_deref());
    let source = match p.recipe.calib.as_deref().unwrap_or("wikitext2") {
        "wikitext2" => CalibSource::Wikitext2,
        "c4" => CalibSource::C4,
        path => CalibSource::File(PathBuf::from(path)),
    };
    let (path, desc) = calib::data::resolve(&source, &dir)?;
    let tok = ckpt.tokenizer("calibration")?;
    let (n, l) = (p.nsamples(), p.calib_seqlen());
    // Windows are drawn in sequence from the seed: the first n are the training windows
    // whether or not GPTQ asks for more.
    let total = p.recipe.gptq_nsamples.unwrap_or(n).max(n);
    let text = calib::data::read(&path)?;
    let tokens = calib::data::windows(&tok, &text, &path, total, l, p.request.seed)?;
    let mut desc = format!("{desc}, {n} × {l} tokens");
    if total > n {
        desc.push_str(&format!(" ({total} windows for GPTQ's Hessians)"));
    }
    Ok((tokens, desc))
}

/// The calibration log (`calibration.csv`): per epoch, then per block.
fn calibration_csv(reports: &[BlockReport]) -> String {
    let mut csv = String::from("block,epoch,loss,seconds\n");
    for rep in reports {
        for e in &rep.epochs {
            csv.push_str(&format!(
                "{},{},{:.6e},{:.2}\n",
                rep.block, e.epoch, e.loss, e.seconds
            ));
        }
    }
    csv.push_str("\nblock,loss_rtn,loss_final,seconds,deployed\n");
    for rep in reports {
        csv.push_str(&format!(
            "{},{:.6e},{:.6e},{:.2},{}\n",
            rep.block,
            rep.loss_rtn,
            rep.loss_final,
            rep.seconds,
            if rep.kept_untrained {
                "untrained"
            } else {
                "trained"
            }
        ));
    }
    csv
}

/// Runs the block-by-block engine with `method` and the plan's weight quantizer; returns the
/// calibration log and the notes for the checkpoint.
fn run_calibration(
    p: &QuantizePlan,
    ckpt: &Checkpoint,
    model: &mut Model,
    blocks: &mut dyn BlockFlow,
    method: &mut dyn Method,
    store: Option<&dyn BlockStore>,
    progress: &mut dyn Progress,
) -> Result<(String, Vec<String>)> {
    let (tokens, data_desc) = calibration_tokens(p, ckpt)?;
    let label = method.label();
    let mut summary = format!("{label}: calibrated on {data_desc}");
    if let Some(t) = method.training_summary() {
        summary.push_str(&format!(", {t}"));
    }
    if let WeightQuantizer::Gptq(g) = p.weight_quantizer {
        summary.push_str(&format!(
            ", weights by GPTQ (damp {}, act order {})",
            g.damp, g.act_order
        ));
    }
    let engine = EngineConfig {
        plan: p.quant.clone(),
        weight_quantizer: p.weight_quantizer,
        method_windows: p.nsamples(),
        activations: p.calib_activations(),
    };
    if engine.activations == candle_core::DType::BF16 {
        summary.push_str(", activations kept in bf16");
    }
    progress.calibration_started(&summary, blocks.num_blocks());
    // Both callbacks report to `progress`; a cell lets them share it.
    let progress = std::cell::RefCell::new(progress);
    let reports = calib::calibrate_model(
        model,
        blocks,
        &tokens,
        method,
        &engine,
        store,
        |b, e| progress.borrow_mut().epoch(b, e),
        |done, total, rep| progress.borrow_mut().block_done(done, total, rep, label),
    )?;
    let progress = progress.into_inner();
    progress.calibration_finished();
    let mut notes = vec![summary];
    for rep in &reports {
        for note in &rep.notes {
            progress.warning(note);
            notes.push(note.clone());
        }
    }
    Ok((calibration_csv(&reports), notes))
}

/// Refuses an output inside the model directory (it would be read while being replaced).
fn check_output_outside(model_dir: &Path, out: &Path) -> Result<()> {
    let model_dir = std::fs::canonicalize(model_dir).unwrap_or(model_dir.to_path_buf());
    let out_parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let out_abs =
        std::fs::canonicalize(out_parent).map(|p| p.join(out.file_name().unwrap_or_default()));
    if let Ok(out_abs) = &out_abs {
        if out_abs.starts_with(&model_dir) {
            return Err(Error::Usage(format!(
                "output {} is inside the model directory {}",
                out.display(),
                model_dir.display()
            )));
        }
    }
    Ok(())
}

/// Quantizes the plan's model and writes its checkpoint.
pub fn run(p: &QuantizePlan, progress: &mut dyn Progress) -> Result<QuantizeOutcome> {
    let req = &p.request;
    let ckpt = Checkpoint::open(&req.model)?;
    if ckpt.quant.is_some() {
        return Err(Error::Usage(format!(
            "{} is already a quantized checkpoint",
            req.model.display()
        )));
    }
    check_output_outside(&ckpt.files.dir, &p.output)?;
    crate::fsutil::check_output(&p.output, req.force)?;
    p.check_model(&ckpt.config)?;
    // The embedding, final norm and head; blocks are read (and written) one at a time.
    // The head is read in f32 only to be quantized (round to nearest); otherwise it is only
    // copied (or rotated, in f64) and stays as stored until written.
    let head = if p.quant.quantize_head {
        Precision::F32
    } else {
        Precision::Stored
    };
    let mut model = ckpt.load_ends(1, head)?;
    let mut method = (p.method.build)(&MethodInput {
        recipe: &p.recipe,
        plan: &p.quant,
        seed: req.seed,
    })?;
    let mut transforms = Vec::new();
    if let Some(r) = p.chosen_recipe {
        let q = &p.quant;
        let line = format!(
            "{}: recipe {r} for W{}A{} (no --recipe given)",
            p.method.name,
            q.weights.as_ref().map_or(16, |w| w.spec.bits),
            q.activations.map_or(16, |a| a.bits)
        );
        progress.info(&line);
        transforms.push(line);
    }
    transforms.extend(method.prepare(&mut model)?);
    let mut config = QuantConfig {
        quant_method: "affq".into(),
        format: checkpoint::FORMAT.into(),
        format_version: checkpoint::FORMAT_VERSION,
        affq_version: crate::VERSION.into(),
        method: p.method.name.into(),
        weights: p.quant.weights.clone(),
        activations: p.quant.activations,
        kv_cache: p.quant.kv_cache,
        quantize_head: p.quant.quantize_head,
        transforms: Vec::new(),
        seed: req.seed,
    };
    let mut extra = Vec::new();
    let mut work = None;
    let mut writer = CheckpointWriter::create(&p.output, req.force)?;
    let mut flow = Streamed {
        ckpt: &ckpt,
        config: model.config.clone(),
        writer: &mut writer,
    };
    if p.calibrated {
        // Everything that decides the result: a resumed run must have the same.
        let model_id = std::fs::canonicalize(&req.model).unwrap_or(req.model.clone());
        let fingerprint = format!(
            "affq {}\nmodel {}\nmethod {}\nrecipe {:?}\nplan {:?}\nseed {}\n",
            crate::VERSION,
            model_id.display(),
            p.method.name,
            p.recipe,
            p.quant,
            req.seed
        );
        let w = WorkDir::open(
            &p.output,
            &fingerprint,
            req.resume,
            req.force,
            model.config.clone(),
            config.clone(),
        )?;
        if w.resumed > 0 {
            progress.resumed(w.resumed);
        }
        let (csv, notes) = run_calibration(
            p,
            &ckpt,
            &mut model,
            &mut flow,
            method.as_mut(),
            Some(&w as &dyn BlockStore),
            progress,
        )
        .inspect_err(|_| w.discard_if_empty())?;
        extra.push(("calibration.csv".to_string(), csv));
        transforms.extend(notes);
        quantize_head(&mut model, &p.quant)?;
        work = Some(w);
    } else {
        for i in 0..flow.num_blocks() {
            let mut block = flow.take(i)?;
            method.prepare_block(&mut block)?;
            quantize_block(&mut block, &p.quant)?;
            flow.put(block)?;
        }
        quantize_head(&mut model, &p.quant)?;
    }
    config.transforms = transforms.clone();
    writer.finish(&model, &ckpt.files.dir, &ckpt.files.config, &config, &extra)?;
    if let Some(w) = work {
        w.finish()?;
    }
    Ok(QuantizeOutcome { config, transforms })
}
