//! The `affq` binary: parses arguments ([`args`], clap), hands them to the library as requests,
//! and prints what comes back. Validation lives in `affq::plan`, the work in the library.

mod args;

use affq::calib::BlockReport;
use affq::eval;
use affq::formats::gguf::{self, ImportDtype};
use affq::methods::{EpochLog, StepPhases};
use affq::quantize::Progress;
use anyhow::Context;
use args::{
    BenchArgs, Cli, Command, Common, DtypeArg, EvalArgs, ExportArgs, GenerateArgs, ImportArgs,
    QuantizeArgs,
};
use clap::Parser;
use std::time::Instant;

fn init_threads(common: &Common) -> anyhow::Result<()> {
    if common.threads == Some(0) {
        return Err(affq::Error::Usage("--threads must be at least 1".into()).into());
    }
    // candle asks for its thread count on every op: from RAYON_NUM_THREADS, else by counting the
    // physical cores in /proc/cpuinfo, every time (≈ 7 % of a decode step). Its answer is pinned
    // once, before any thread starts; affq's own pool keeps its size (--threads, else
    // RAYON_NUM_THREADS, else every logical core, as rayon would choose).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let pool = common.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
        return rayon::ThreadPoolBuilder::new()
            .num_threads(pool)
            .build_global()
            .context("cannot start the thread pool");
    }
    if let Some(n) = common.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    Ok(())
}

/// Calibration runs candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`
/// unless it is set). candle hands part of every element-wise op to workers of its own, which
/// spin between ops, and waits at a barrier until every part is back; a training step's ops are
/// small (one window of 256 tokens) and alternate with GEMMs on affq's own pool, so the two pools'
/// spinning threads outnumber the cores and the caller waits for a worker that has none. SmolLM2's
/// W4A4 preset in same-call pairs on two cores: 0.939 × and 0.844 × the wall time with the weight
/// quantizer beside the training, 0.823 × with `--sequential-blocks`; 0.983 × at 2 048 tokens a
/// step (batch 4 × 512); the same checkpoint bytes (element-wise results do not depend on the
/// split). Eval keeps the workers: its ops over whole windows ran 1.13 × slower without them.
fn serial_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn run_import(a: ImportArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let dtype = match a.dtype {
        DtypeArg::F16 => ImportDtype::F16,
        DtypeArg::F32 => ImportDtype::F32,
    };
    let t0 = Instant::now();
    let report = gguf::import(&a.gguf, &a.output, dtype, a.force)?;
    if a.common.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
        println!("{v}");
    } else {
        println!(
            "imported {} ({} tensors, {} parameters; {:?}) with a {} tokenizer into {} in {:.1}s",
            report.architecture,
            report.tensors,
            report.parameters,
            report.tensor_types,
            report.tokenizer,
            report.output.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} windows  ppl {msg}  [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    let req = a.request();
    let out = eval::run(&req, |done, total, ppl| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{ppl:.4}"));
    })?;
    bar.finish_and_clear();
    let res = &out.result;
    if a.common.json {
        let mut v = serde_json::to_value(res)?;
        v["model"] = serde_json::json!(a.model.display().to_string());
        v["dataset"] = serde_json::json!(req.dataset.name());
        v["text_tokens"] = serde_json::json!(out.text_tokens);
        v["bos"] = serde_json::json!(out.bos);
        v["load_seconds"] = serde_json::json!(out.load_seconds);
        v["kernels"] = serde_json::json!(out.kernels);
        if let Some(k) = &out.kld {
            for (key, val) in serde_json::to_value(k)?.as_object().into_iter().flatten() {
                v[key.as_str()] = val.clone();
            }
        }
        println!("{v}");
    } else {
        println!(
            "{} PPL {:.4}  ({} windows × {} tokens, {} predictions, protocol {:?}, BOS {})",
            req.dataset.name(),
            res.ppl,
            res.windows,
            res.seqlen,
            res.predictions,
            req.protocol,
            out.bos
        );
        println!(
            "model {}  text tokens {}  eval {:.1}s  {:.0} tok/s  (load {:.1}s)  kernels {}",
            a.model.display(),
            out.text_tokens,
            res.seconds,
            res.tok_per_s,
            out.load_seconds,
            out.kernels
        );
        if let Some(k) = &out.kld {
            println!(
                "KLD vs {}: mean {:.6}  median {:.6}  p99 {:.6}  max {:.4}  top-1 agreement {:.2} %  PPL(base) {:.4}  PPL/PPL(base) {:.4}",
                k.base.display(),
                k.kld_mean,
                k.kld_median,
                k.kld_p99,
                k.kld_max,
                100.0 * k.top1_agreement,
                k.ppl_base,
                k.ppl_ratio
            );
        }
    }
    Ok(())
}

/// Shows a quantization run on stderr: a progress bar over blocks, a line per finished block.
struct Bars {
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for Bars {
    fn resumed(&mut self, blocks: &[usize]) {
        if !self.quiet {
            eprintln!(
                "resuming: blocks {} were finished by an earlier run",
                affq::calib::shard::ranges(blocks)
            );
        }
    }
    fn calibration_started(&mut self, summary: &str, blocks: usize) {
        if !self.quiet {
            eprintln!("{summary}");
        }
        let bar = indicatif::ProgressBar::new(blocks as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "blocks {pos}/{len} {bar:30} [{elapsed}<{eta}] {msg}",
            )
            .expect("valid template"),
        );
        self.bar = Some(bar);
    }
    fn epoch(&mut self, block: usize, e: &EpochLog) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "block {block} epoch {} loss {:.3e}",
                e.epoch, e.loss
            ));
        }
    }
    fn block_done(&mut self, done: usize, _total: usize, rep: &BlockReport, label: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            let mut p = StepPhases::default();
            for e in &rep.epochs {
                p.add(&e.phases);
            }
            let phases = if p.steps > 0 {
                format!(
                    "; {} steps: weights {:.2}s, forward {:.2}s, backward {:.2}s, optimizer {:.2}s",
                    p.steps, p.weights, p.forward, p.backward, p.optimizer
                )
            } else {
                String::new()
            };
            bar.suspend(|| {
                eprintln!(
                    "block {:>2}: loss rtn {:.3e} -> {label} {:.3e} ({:.1}s{phases})",
                    rep.block, rep.loss_rtn, rep.loss_final, rep.seconds
                )
            });
        }
    }
    fn calibration_finished(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
    fn warning(&mut self, msg: &str) {
        eprintln!("warning: {msg}");
    }
    fn info(&mut self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}

fn run_quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    serial_elementwise();
    init_threads(&a.common)?;
    let plan = affq::plan::plan(a.request())?;
    let t0 = Instant::now();
    let mut bars = Bars {
        quiet: a.common.json,
        bar: None,
    };
    let out = affq::quantize::run(&plan, &mut bars)?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(s) = &out.shard {
        if a.common.json {
            let mut v = serde_json::to_value(s)?;
            v["output"] = serde_json::json!(plan.output.display().to_string());
            v["seconds"] = serde_json::json!(secs);
            println!("{v}");
        } else {
            let ranges = affq::calib::shard::ranges;
            println!(
                "shard {}: blocks {}..{} of {}: calibrated [{}], already finished [{}] in {secs:.1}s (forward to block {}: {:.1}s) -> {}",
                s.shard,
                s.blocks[0],
                s.blocks[1],
                s.total_blocks,
                ranges(&s.calibrated),
                ranges(&s.already_done),
                s.blocks[0],
                s.forward_seconds,
                s.work_dir.display()
            );
            if s.missing.is_empty() {
                println!(
                    "  every block is finished: assemble {} with the same flags and --merge",
                    plan.output.display()
                );
            } else {
                println!(
                    "  blocks still missing (other shards): {}",
                    ranges(&s.missing)
                );
            }
        }
        return Ok(());
    }
    if a.common.json {
        let mut v = serde_json::to_value(&out.config)?;
        v["output"] = serde_json::json!(plan.output.display().to_string());
        v["seconds"] = serde_json::json!(secs);
        println!("{v}");
    } else {
        let q = &plan.quant;
        let wdesc = q
            .weights
            .as_ref()
            .map_or("16".to_string(), |w| format!("{}", w.spec.bits));
        let bits =
            |s: Option<affq::quant::QuantSpec>| s.map_or("16".to_string(), |s| s.bits.to_string());
        println!(
            "quantized {} with {}: W{wdesc}A{}KV{} -> {} in {secs:.1}s",
            a.model.display(),
            plan.method.name,
            bits(q.activations),
            bits(q.kv_cache),
            plan.output.display()
        );
        for t in out.transforms {
            println!("  {t}");
        }
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let r = affq::export::export(&a.request())?;
    if a.common.json {
        println!("{}", serde_json::to_value(&r)?);
        return Ok(());
    }
    if let Some(h) = &r.hf {
        println!(
            "exported {} as {} ({} quantized linears; {} tensors; {:.1} MB) -> {} in {:.1}s, exact",
            a.checkpoint.display(),
            r.format,
            h.quantized_linears,
            h.tensors,
            h.bytes as f64 / 1e6,
            r.output.display(),
            r.seconds
        );
        return Ok(());
    }
    let Some(g) = &r.gguf else { return Ok(()) };
    println!(
        "exported {} as GGUF ({}, linears {}; {} tensors {:?}; {:.1} MB) -> {} in {:.1}s{}",
        a.checkpoint.display(),
        g.architecture,
        g.linear_type,
        g.tensors,
        g.tensor_types,
        g.bytes as f64 / 1e6,
        r.output.display(),
        r.seconds,
        if g.exact { ", exact" } else { "" }
    );
    for n in &g.notes {
        println!("  note: {n}");
    }
    for d in &g.dropped {
        println!("  dropped: {d}");
    }
    for k in &g.lossy {
        println!(
            "  lossy: {} ({} tensors): relative weight error {:.3e} ({})",
            k.kind, k.tensors, k.rel_error, k.how
        );
    }
    Ok(())
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    use std::io::Write;
    init_threads(&a.common)?;
    let req = a.request()?;
    let json = a.common.json;
    let mut stdout = std::io::stdout();
    let out = affq::runtime::generate::run(&req, |piece| {
        if !json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let g = &out.generation;
    if json {
        println!("{}", serde_json::to_value(&out)?);
    } else {
        println!();
        eprintln!(
            "prompt {} tokens {:.1} tok/s | generated {} tokens, decode {:.1} tok/s | stop {:?} | kernels {} | KV {} B/token (K{} V{} bits) | load {:.1}s",
            g.prompt_ids.len(),
            out.prompt_tok_per_s,
            g.ids.len(),
            out.decode_tok_per_s,
            g.stop,
            out.kernels,
            g.kv_bytes_per_token,
            g.kv_bits.0,
            g.kv_bits.1,
            out.load_seconds
        );
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    init_threads(&a.common)?;
    let r = affq::runtime::bench::run(&a.request())?;
    if a.common.json {
        println!("{}", serde_json::to_value(&r)?);
        return Ok(());
    }
    println!("| model | kernels | threads | test | t/s |");
    println!("| --- | --- | ---: | ---: | ---: |");
    if r.prompt_tokens > 0 {
        println!(
            "| {} | {} | {} | pp{} | {:.2} ± {:.2} |",
            r.model,
            r.kernels,
            r.threads,
            r.prompt_tokens,
            r.prefill_tok_per_s,
            r.prefill_tok_per_s_stddev
        );
    }
    if r.gen_tokens > 0 {
        println!(
            "| {} | {} | {} | tg{} | {:.2} ± {:.2} |",
            r.model,
            r.kernels,
            r.threads,
            r.gen_tokens,
            r.decode_tok_per_s,
            r.decode_tok_per_s_stddev
        );
    }
    println!(
        "peak RSS {:.0} MiB, KV cache {} B/token (K{} V{} bits), load {:.1}s",
        r.peak_rss_mb, r.kv_bytes_per_token, r.kv_bits.0, r.kv_bits.1, r.load_seconds
    );
    Ok(())
}

fn main() {
    // Die quietly on a closed stdout (`affq eval … | head -1`), as Unix tools do, instead of
    // panicking on the failed write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    affq::heap::tune();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Import(a) => run_import(a),
        Command::Eval(a) => run_eval(a),
        Command::Quantize(a) => run_quantize(*a),
        Command::Export(a) => run_export(a),
        Command::Generate(a) => run_generate(a),
        Command::Bench(a) => run_bench(a),
    };
    if let Err(e) = result {
        let code = e
            .downcast_ref::<affq::Error>()
            .map_or(1, affq::Error::exit_code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}
