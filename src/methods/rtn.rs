//! Round to nearest: no transform; the engine's weight quantizer (RTN or GPTQ) does everything.

use super::{Method, MethodInput, MethodSpec};

pub const SPEC: MethodSpec = MethodSpec {
    name: "rtn",
    about: "Round to nearest, no transform.",
    trained: false,
    preset: None,
    scheme_recipe: |_, _| None,
    own_keys: &[],
    asym_activations: false,
    merged_mode: true,
    build: |_: &MethodInput| Ok(Box::new(Rtn)),
};

pub struct Rtn;

impl Method for Rtn {
    fn label(&self) -> &'static str {
        "gptq"
    }
}
