//! Running a validated [`QuantizePlan`]: open the model, the method's whole-model step, the
//! block-by-block calibration (when the plan needs it) or plain round-to-nearest, and the
//! crash-safe checkpoint write. What happens is reported through [`Progress`], so the binary
//! decides how it is shown.

use crate::calib::data::CalibSource;
use crate::calib::resume::{Access, WorkDir};
use crate::calib::shard::{self, Shard};
use crate::calib::{
    self, BlockFlow, BlockReport, BlockStore, CalibOutcome, EngineConfig, Schedule, WeightQuantizer,
};
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
use std::time::Duration;

/// The calibration's blocks read one at a time from the source checkpoint and written to the
/// output as they are finished: a quantization holds one block's weights (two while one block's
/// weight quantizer runs beside the next block's training). A shard has no writer
/// (its blocks go to the work directory).
struct Streamed<'a> {
    ckpt: &'a Checkpoint,
    config: Arc<ModelConfig>,
    writer: Option<&'a mut CheckpointWriter>,
}

impl BlockFlow for Streamed<'_> {
    fn num_blocks(&self) -> usize {
        self.config.num_layers
    }
    fn take(&mut self, i: usize) -> Result<Block> {
        self.ckpt.load_block(self.config.clone(), i, Precision::F32)
    }
    fn put(&mut self, block: Block) -> Result<()> {
        match &mut self.writer {
            Some(w) => w.add_block(&block),
            None => Err(Error::Runtime(format!(
                "block {}: a shard keeps its blocks in the work directory",
                block.index()
            ))),
        }
    }
}

/// Observer of a quantization run.
pub trait Progress {
    /// A resumed run found these blocks finished.
    fn resumed(&mut self, _blocks: &[usize]) {}
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
    /// A shard's run (which writes no checkpoint): what it did.
    pub shard: Option<ShardOutcome>,
}

/// The plan's calibration text and its description (what the checkpoint's notes say of it).
fn calibration_source(p: &QuantizePlan) -> Result<(PathBuf, String)> {
    let dir = data::data_dir(p.request.data_dir.as_deref());
    let source = match p.recipe.calib.as_deref().unwrap_or("wikitext2") {
        "wikitext2" => CalibSource::Wikitext2,
        "c4" => CalibSource::C4,
        path => CalibSource::File(PathBuf::from(path)),
    };
    let (path, desc) = calib::data::resolve(&source, &dir)?;
    let (n, l) = (training_windows(p), p.calib_seqlen());
    let mut desc = format!("{desc}, {n} × {l} tokens");
    if gptq_windows(p) > n {
        desc.push_str(&format!(
            " ({} windows for GPTQ's Hessians)",
            gptq_windows(p)
        ));
    }
    Ok((path, desc))
}

/// Windows the method reads: the recipe's, or only the deploy check's probe windows where
/// nothing trains and only the keys are measured (the engine reads no more).
fn training_windows(p: &QuantizePlan) -> usize {
    if keys_only(p) {
        p.nsamples().min(calib::PROBE_WINDOWS)
    } else {
        p.nsamples()
    }
}

/// Windows drawn: the training windows, and more where GPTQ asks for more.
fn gptq_windows(p: &QuantizePlan) -> usize {
    let n = training_windows(p);
    if p.weight_quantizer == WeightQuantizer::Rtn {
        return n;
    }
    p.recipe.gptq_nsamples.unwrap_or(n).max(n)
}

/// Calibration data of the plan, tokenized into windows; and its description.
fn calibration_tokens(p: &QuantizePlan, ckpt: &Checkpoint) -> Result<(Tensor, String)> {
    let (path, desc) = calibration_source(p)?;
    let tok = ckpt.tokenizer("calibration")?;
    // Windows are drawn in sequence from the seed: the first n are the training windows
    // whether or not GPTQ asks for more.
    let text = calib::data::read(&path)?;
    let tokens = calib::data::windows(
        &tok,
        &text,
        &path,
        gptq_windows(p),
        p.calib_seqlen(),
        p.request.seed,
    )?;
    Ok((tokens, desc))
}

/// The first line of a calibrated checkpoint's notes: data, training and weight quantizer.
fn calibration_summary(p: &QuantizePlan, method: &dyn Method, data_desc: &str) -> String {
    let mut summary = format!("{}: calibrated on {data_desc}", calib_label(p, method));
    if let Some(t) = method.training_summary() {
        summary.push_str(&format!(", {t}"));
    }
    if let WeightQuantizer::Gptq(g) = p.weight_quantizer {
        summary.push_str(&format!(
            ", weights by GPTQ (damp {}, act order {})",
            g.damp, g.act_order
        ));
        if gptq_fp_inputs(p) {
            summary.push_str(", Hessians from full-precision inputs");
        }
        if let Some(a) = g.v2_alpha {
            let windows = match g.v2_windows {
                Some(n) => format!(", cross moment from {n} windows"),
                None => String::new(),
            };
            summary.push_str(&format!(
                ", GPTQ v2 (fitted to the full-precision inputs' outputs, alpha {a}{windows})"
            ));
        }
    }
    if p.recipe.quantized_inputs == Some(true) {
        summary.push_str(", trained on the quantized model's own block inputs");
    }
    if int_products(p) {
        summary.push_str(", integer products (8-bit gradients)");
    }
    if p.calib_activations() == candle_core::DType::BF16 {
        summary.push_str(", activations kept in bf16");
    }
    if p.conditions_keys() {
        summary.push_str(&format!(
            ", keys smoothed (α {}) and centred before KV quantization",
            crate::calib::key_smooth::ALPHA
        ));
    }
    summary
}

/// What the calibration is named by in logs and notes: the method's label, or `kv` when only
/// the keys are calibrated (an untrained method with RTN weights).
fn calib_label(p: &QuantizePlan, method: &dyn Method) -> &'static str {
    if keys_only(p) {
        "kv"
    } else {
        method.label()
    }
}

/// An untrained method with RTN weights: a calibration only because the keys are conditioned.
fn keys_only(p: &QuantizePlan) -> bool {
    !p.method.trained && p.weight_quantizer == WeightQuantizer::Rtn
}

/// Whether the calibration runs on the integer products (`--step-products int`): a trained
/// method with quantized activations on a machine with an integer dot-product kernel.
fn int_products(p: &QuantizePlan) -> bool {
    p.method.trained
        && p.quant.activations.is_some()
        && p.recipe.step_products.as_deref() == Some("int")
        && crate::backend::grid_train::IntGridProducts::detect().is_some()
}

fn gptq_fp_inputs(p: &QuantizePlan) -> bool {
    p.recipe.gptq_fp_inputs == Some(true)
}

/// The checkpoint's notes of a calibration: the summary, then every block's notes (each also
/// shown as a warning).
fn calibration_notes(
    summary: String,
    reports: &[BlockReport],
    progress: &mut dyn Progress,
) -> Vec<String> {
    let mut notes = vec![summary];
    for rep in reports {
        for note in &rep.notes {
            progress.warning(note);
            notes.push(note.clone());
        }
    }
    notes
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

/// The engine's settings of the plan.
fn engine_config(p: &QuantizePlan) -> EngineConfig {
    EngineConfig {
        plan: p.quant.clone(),
        weight_quantizer: p.weight_quantizer,
        method_windows: p.nsamples(),
        activations: p.calib_activations(),
        gptq_fp_inputs: gptq_fp_inputs(p),
        keep_trained: p.recipe.keep_trained == Some(true),
        quantized_inputs: p.recipe.quantized_inputs == Some(true),
        condition_keys: p.conditions_keys(),
        overlap: !p.request.sequential_blocks,
    }
}

/// Runs the block-by-block engine with `method` and the plan's weight quantizer over the blocks
/// of `schedule`; returns what it did and the checkpoint's summary line.
#[allow(clippy::too_many_arguments)]
fn run_calibration(
    p: &QuantizePlan,
    ckpt: &Checkpoint,
    model: &mut Model,
    blocks: &mut dyn BlockFlow,
    method: &mut dyn Method,
    store: Option<&dyn BlockStore>,
    schedule: &Schedule,
    progress: &mut dyn Progress,
) -> Result<(CalibOutcome, String)> {
    let (tokens, data_desc) = calibration_tokens(p, ckpt)?;
    let summary = calibration_summary(p, method, &data_desc);
    let label = calib_label(p, method);
    let engine = engine_config(p);
    let n = match schedule {
        Schedule::Whole => blocks.num_blocks(),
        Schedule::Shard(r) => r.len(),
    };
    progress.calibration_started(&summary, n);
    let _products = int_products(p).then(crate::backend::grid_train::Installed::install);
    // Both callbacks report to `progress`; a cell lets them share it.
    let progress = std::cell::RefCell::new(progress);
    let outcome = calib::calibrate_model(
        model,
        blocks,
        &tokens,
        method,
        &engine,
        store,
        schedule,
        |b, e| progress.borrow_mut().epoch(b, e),
        |done, total, rep| progress.borrow_mut().block_done(done, total, rep, label),
    )?;
    progress.into_inner().calibration_finished();
    Ok((outcome, summary))
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
    let (p, notes) = p.for_model(crate::formats::hf_export::model_dtype(&ckpt), &ckpt.config);
    let p = &p;
    for n in &notes {
        progress.warning(n);
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
    if let Some(shard) = p.shard {
        let outcome = run_shard(
            p,
            &ckpt,
            &mut model,
            method.as_mut(),
            shard,
            &config,
            progress,
        )?;
        return Ok(QuantizeOutcome {
            config,
            transforms,
            shard: Some(outcome),
        });
    }
    let mut extra = Vec::new();
    let mut work = None;
    let work_dir = if p.calibrated {
        let access = if req.merge {
            Access::Merge
        } else {
            Access::Single {
                resume: req.resume,
                force: req.force,
            }
        };
        let w = WorkDir::open(
            &p.output,
            &fingerprint(p),
            access,
            Duration::from_secs(req.lock_timeout),
            model.config.clone(),
            config.clone(),
        )?;
        if req.merge {
            let missing = w.missing(model.config.num_layers);
            if !missing.is_empty() {
                return Err(Error::Usage(format!(
                    "{}: blocks {} of {} are not finished{}; run the shards that own them (same flags, --shard I/N) and merge again",
                    w.path().display(),
                    shard::ranges(&missing),
                    model.config.num_layers,
                    in_progress(&w, &missing)
                )));
            }
        }
        Some(w)
    } else {
        None
    };
    let mut writer = CheckpointWriter::create(&p.output, req.force)?;
    let mut flow = Streamed {
        ckpt: &ckpt,
        config: model.config.clone(),
        writer: Some(&mut writer),
    };
    if let Some(w) = work_dir {
        let (reports, summary) = if req.merge {
            let (_, data_desc) = calibration_source(p)?;
            let summary = calibration_summary(p, method.as_ref(), &data_desc);
            progress.info(&format!(
                "merging {} blocks from {}",
                flow.num_blocks(),
                w.path().display()
            ));
            let mut reports = Vec::with_capacity(flow.num_blocks());
            for i in 0..flow.num_blocks() {
                let (block, report) = w.load(i)?.ok_or_else(|| {
                    Error::Runtime(format!("block {i} vanished from {}", w.path().display()))
                })?;
                flow.put(block)?;
                reports.push(report);
            }
            (reports, summary)
        } else {
            if !w.resumed.is_empty() {
                progress.resumed(&w.resumed);
            }
            let (outcome, summary) = run_calibration(
                p,
                &ckpt,
                &mut model,
                &mut flow,
                method.as_mut(),
                Some(&w as &dyn BlockStore),
                &Schedule::Whole,
                progress,
            )
            .inspect_err(|_| w.discard_if_empty())?;
            (outcome.reports, summary)
        };
        extra.push(("calibration.csv".to_string(), calibration_csv(&reports)));
        transforms.extend(calibration_notes(summary, &reports, progress));
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
    Ok(QuantizeOutcome {
        config,
        transforms,
        shard: None,
    })
}

/// Everything that decides a calibration's result: a resumed run, every shard and the merge must
/// have the same (pinned in the work directory's `run.json`).
fn fingerprint(p: &QuantizePlan) -> String {
    let req = &p.request;
    let model_id = std::fs::canonicalize(&req.model).unwrap_or(req.model.clone());
    format!(
        "affq {}\nmodel {}\nmethod {}\nrecipe {:?}\nplan {:?}\nseed {}\n",
        crate::VERSION,
        model_id.display(),
        p.method.name,
        p.recipe,
        p.quant,
        req.seed
    )
}

/// ` (block N held by pid P on HOST, …)` for the blocks of `ids` that a live process holds.
fn in_progress(w: &WorkDir, ids: &[usize]) -> String {
    let held: Vec<String> = ids
        .iter()
        .filter_map(|&i| w.holder(i).map(|o| format!("block {i} held by {o}")))
        .collect();
    if held.is_empty() {
        String::new()
    } else {
        format!(" ({})", held.join(", "))
    }
}

/// What one shard of a sharded calibration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardOutcome {
    /// `I/N`.
    pub shard: String,
    /// The blocks it owns, `[start, end)`.
    pub blocks: [usize; 2],
    pub total_blocks: usize,
    /// Blocks it calibrated.
    pub calibrated: Vec<usize>,
    /// Blocks of its range it found finished (by an earlier run or a duplicate shard).
    pub already_done: Vec<usize>,
    /// Blocks of its range it waited for while another process calibrated them.
    pub waited_for: Vec<usize>,
    /// Blocks of the whole model still missing in the work directory when it ended.
    pub missing: Vec<usize>,
    pub work_dir: PathBuf,
    /// Seconds spent running the blocks before its range forward (its first pass).
    pub forward_seconds: f64,
}

/// One shard: its blocks calibrated into the work directory. Blocks that another live process
/// is calibrating are waited for (and taken over if that process dies), so a shard that ends
/// without an error leaves every block of its range finished.
fn run_shard(
    p: &QuantizePlan,
    ckpt: &Checkpoint,
    model: &mut Model,
    method: &mut dyn Method,
    shard: Shard,
    config: &QuantConfig,
    progress: &mut dyn Progress,
) -> Result<ShardOutcome> {
    let w = WorkDir::open(
        &p.output,
        &fingerprint(p),
        Access::Shard,
        Duration::from_secs(p.request.lock_timeout),
        model.config.clone(),
        config.clone(),
    )?;
    let total = model.config.num_layers;
    let range = shard.blocks(total);
    let mut out = ShardOutcome {
        shard: shard.to_string(),
        blocks: [range.start, range.end],
        total_blocks: total,
        calibrated: Vec::new(),
        already_done: Vec::new(),
        waited_for: Vec::new(),
        missing: Vec::new(),
        work_dir: w.path().to_path_buf(),
        forward_seconds: 0.0,
    };
    let todo: Vec<usize> = range.clone().filter(|&i| !w.contains(i)).collect();
    progress.info(&format!(
        "shard {shard}: blocks {}..{} of {total} ({} to calibrate) in {}",
        range.start,
        range.end,
        todo.len(),
        w.path().display()
    ));
    let mut flow = Streamed {
        ckpt,
        config: model.config.clone(),
        writer: None,
    };
    let mut first = true;
    while !range.is_empty() && range.clone().any(|i| !w.contains(i)) {
        if !w.exists() {
            progress.warning(&format!(
                "{}: the work directory is gone (merged or removed by another process)",
                w.path().display()
            ));
            break;
        }
        let (pass, _) = run_calibration(
            p,
            ckpt,
            model,
            &mut flow,
            method,
            Some(&w as &dyn BlockStore),
            &Schedule::Shard(range.clone()),
            progress,
        )?;
        if first {
            out.forward_seconds = pass.prefix_seconds;
            first = false;
        }
        for rep in &pass.reports {
            for note in &rep.notes {
                progress.warning(note);
            }
        }
        out.calibrated.extend(pass.reports.iter().map(|r| r.block));
        if pass.busy.is_empty() {
            break;
        }
        let busy: Vec<usize> = pass.busy.iter().map(|(i, _)| *i).collect();
        for (i, who) in &pass.busy {
            progress.info(&format!(
                "block {i} is being calibrated by {who}; waiting for it"
            ));
        }
        out.waited_for.extend(&busy);
        // Blocks whose holder finished are done; those whose holder died are claimed next pass.
        w.wait_for(&busy, Duration::from_secs(2));
    }
    for t in w.take_takeovers() {
        progress.warning(&t);
    }
    out.already_done = range.filter(|i| !out.calibrated.contains(i)).collect();
    out.missing = w.missing(total);
    Ok(out)
}
