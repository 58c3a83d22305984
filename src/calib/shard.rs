//! Which blocks one process of a sharded calibration owns.
//!
//! Shard `I` of `N` (0-based) owns a contiguous, balanced range of the model's `L` blocks: the
//! first `L mod N` shards get `⌊L/N⌋ + 1` blocks, the others `⌊L/N⌋`. Every shard first runs the
//! full-precision blocks before its range forward to get its first block's inputs (no training
//! there), so a later shard pays a longer forward pass; at calibration budgets the forward is a
//! small fraction of a block's training (the note of the sharding issue gives the figures).

use crate::error::{Error, Result};
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Usage(format!(
                "shard {index}/{count}: the index must be in 0..{count} (0-based) and the count at least 1"
            )));
        }
        Ok(Shard { index, count })
    }

    /// `I/N` as given to `--shard`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::Usage(format!(
                "--shard {s}: expected I/N, the 0-based shard index and the number of shards (e.g. 0/4)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Self::new(i, n)
    }

    /// From a scheduler's environment (`get` reads a variable): Slurm array jobs
    /// ((`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN`) / `SLURM_ARRAY_TASK_STEP`, of
    /// `SLURM_ARRAY_TASK_COUNT`), or a
    /// Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with the count from `shards`). `shards`
    /// overrides Slurm's count.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>, shards: Option<usize>) -> Result<Self> {
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Usage(format!(
                        "--shard-from-env: {var}={v:?} is not a non-negative integer"
                    ))
                }),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = match shards {
                Some(n) => n,
                None => num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                    Error::Usage(
                        "--shard-from-env: SLURM_ARRAY_TASK_COUNT is not set; pass --shards N"
                            .into(),
                    )
                })?,
            };
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let off = id.checked_sub(min).ok_or_else(|| {
                Error::Usage(format!(
                    "--shard-from-env: SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
                ))
            })?;
            if off % step != 0 {
                return Err(Error::Usage(format!(
                    "--shard-from-env: SLURM_ARRAY_TASK_ID {id} is not on the array's step {step} from {min}; use a plain range (--array=0-{})",
                    count.saturating_sub(1)
                )));
            }
            return Self::new(off / step, count);
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = shards.ok_or_else(|| {
                Error::Usage(
                    "--shard-from-env: a Kubernetes Indexed Job gives JOB_COMPLETION_INDEX but not the number of shards; pass --shards N (the Job's completions)"
                        .into(),
                )
            })?;
            return Self::new(index, count);
        }
        Err(Error::Usage(
            "--shard-from-env: neither SLURM_ARRAY_TASK_ID (Slurm array job) nor JOB_COMPLETION_INDEX (Kubernetes Indexed Job) is set; use --shard I/N"
                .into(),
        ))
    }

    /// The blocks of a `total`-block model this shard calibrates.
    pub fn blocks(&self, total: usize) -> Range<usize> {
        let (q, r) = (total / self.count, total % self.count);
        let start = self.index * q + self.index.min(r);
        let len = q + usize::from(self.index < r);
        start..start + len
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// `0..3, 5, 7..9` (half-open ranges) for a sorted list of block indices.
pub fn ranges(ids: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut k = 0;
    while k < ids.len() {
        let mut e = k;
        while e + 1 < ids.len() && ids[e + 1] == ids[e] + 1 {
            e += 1;
        }
        out.push(if e == k {
            ids[k].to_string()
        } else {
            format!("{}..{}", ids[k], ids[e] + 1)
        });
        k = e + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_blocks_in_balanced_contiguous_ranges() {
        for total in 0..40 {
            for count in 1..12 {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard::new(index, count).unwrap().blocks(total);
                    assert_eq!(r.start, next);
                    assert!(r.len() == total / count || r.len() == total / count + 1);
                    next = r.end;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!(Shard::parse("1/3").unwrap().blocks(30), 10..20);
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("1-3").is_err());
    }

    #[test]
    fn scheduler_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        assert_eq!(
            Shard::from_env(&slurm, None).unwrap(),
            Shard::new(1, 3).unwrap()
        );
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::from_env(&stepped, None).unwrap(),
            Shard::new(3, 4).unwrap()
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::from_env(&k8s, Some(4)).unwrap(),
            Shard::new(2, 4).unwrap()
        );
        assert!(Shard::from_env(&k8s, None).is_err());
        assert!(Shard::from_env(&env(&[]), Some(2)).is_err());
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0..3, 5, 7..9");
    }
}
