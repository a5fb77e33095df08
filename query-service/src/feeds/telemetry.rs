//! GPU telemetry (`GET /gpus/stream`, `GET /executors/{id}/telemetry`): the samples executors
//! publish on `OVERFLY_TELEMETRY` (`overfly.telemetry.<executor>.<gpu index>`, kept one hour),
//! live, resumable with `Last-Event-ID` within that hour.

use overfly_schemas::wire::TelemetrySample;

use super::{Fanout, Frame, Message, Select};

/// The shared fan-out of the telemetry stream.
pub type TelemetryHub = Fanout<Sample>;

/// One sample as the feed carries it.
pub struct Sample(pub TelemetrySample);

impl Message for Sample {
    fn decode(_sequence: u64, payload: &[u8]) -> anyhow::Result<Self> {
        Ok(Self(serde_json::from_slice(payload)?))
    }

    fn event_type(&self) -> &str {
        "sample"
    }

    fn render(&self) -> String {
        serde_json::to_string(&self.0).expect("samples serialize")
    }
}

/// Samples of one executor's GPUs, or of every GPU.
struct Executor(Option<String>);

impl Select<Sample> for Executor {
    async fn accepts(&mut self, sample: &Sample) -> bool {
        self.0.as_ref().is_none_or(|id| *id == sample.0.executor_id)
    }
}

/// The samples of `executor_id`'s GPUs (every GPU's without one) after stream sequence
/// `after` (the stored ones first, then live), or from now on without it.
pub async fn feed(
    hub: &TelemetryHub,
    executor_id: Option<String>,
    after: Option<u64>,
) -> anyhow::Result<impl futures::Stream<Item = Frame> + Send + use<>> {
    let subject = format!(
        "{}.{}.*",
        overfly_schemas::subjects::TELEMETRY_PREFIX,
        executor_id.as_deref().unwrap_or("*")
    );
    super::feed(hub, subject, after, Executor(executor_id)).await
}
