//! Loading a GGUF's projections for our kernels ([`super::kernels`]): Q4_0, Q4_1 and Q8_0 tensors
//! are used as stored; any other type is converted to Q8_0 once at load.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Content;

use super::LlmError;
use super::kernels::{Format, Isa, QActs, QMatrix, matmul};

/// The tensor `name` of the GGUF as a matrix our kernels take.
pub(crate) fn load_matrix<R: Read + Seek>(
    ct: &Content,
    r: &mut R,
    name: &str,
) -> Result<QMatrix, LlmError> {
    let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{name}: {e}"));
    let t = ct.tensor(r, name, &Device::Cpu).map_err(|e| load(&e))?;
    let (n, k) = t.shape().dims2().map_err(|e| load(&e))?;
    let format = match t.dtype() {
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        _ => None,
    };
    match format {
        Some(format) => QMatrix::new(format, n, k, t.data()?.into_owned()),
        None => {
            tracing::info!(tensor = name, dtype = ?t.dtype(), "converted to Q8_0 (no kernel for its type)");
            let values = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            QMatrix::quantize_q8_0(&values, n, k)
        }
    }
}

/// A projection whose output columns may be several weight matrices side by side (q|k|v,
/// gate|up): one call quantises the activations once for all of them.
pub(crate) struct Linear {
    weights: Arc<QMatrix>,
    isa: Isa,
}

impl Linear {
    pub(crate) fn new(weights: Arc<QMatrix>, isa: Isa) -> Self {
        Self { weights, isa }
    }

    pub(crate) fn stacked(parts: Vec<QMatrix>, isa: Isa) -> Result<Self, LlmError> {
        Ok(Self::new(Arc::new(QMatrix::stack(parts)?), isa))
    }

    /// `[rows, k]` → `[rows, out]`, row-major.
    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let acts = QActs::quantize(x, rows, self.weights.cols());
        matmul(self.isa, &self.weights, &acts)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.weights.bytes()
    }
}
