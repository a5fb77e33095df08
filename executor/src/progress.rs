//! The progress protocol: a stdout line `OVERFLY {"progress":0.42,"metrics":{"loss":0.31}}`
//! becomes a progress report. Reports are rate-limited per run: updates arriving faster are
//! merged (latest progress, latest value of each metric) and sent together.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

pub const PREFIX: &str = "OVERFLY ";
/// At most one progress report per run per this interval (the last one is always sent).
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// One parsed progress line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    pub progress: Option<f64>,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    metrics: BTreeMap<String, serde_json::Value>,
}

/// `Some` for a well-formed protocol line. Progress is clamped to 0..=1; metrics that are
/// not finite numbers, or whose names are empty or longer than 64 bytes, are dropped (the
/// command service would refuse the whole report for one of them).
pub fn parse(line: &str) -> Option<Update> {
    let json = line.strip_prefix(PREFIX)?;
    let parsed: Line = serde_json::from_str(json.trim()).ok()?;
    let progress = parsed
        .progress
        .filter(|p| p.is_finite())
        .map(|p| p.clamp(0.0, 1.0));
    let metrics = parsed
        .metrics
        .into_iter()
        .filter(|(name, _)| !name.is_empty() && name.len() <= 64)
        .filter_map(|(name, value)| Some((name, value.as_f64().filter(|v| v.is_finite())?)))
        .take(64)
        .collect();
    Some(Update { progress, metrics })
}

/// Updates not yet reported.
#[derive(Debug, Default)]
pub struct Pending {
    update: Option<Update>,
}

impl Pending {
    pub fn merge(&mut self, update: Update) {
        let pending = self.update.get_or_insert_with(Update::default);
        if update.progress.is_some() {
            pending.progress = update.progress;
        }
        pending.metrics.extend(update.metrics);
        if pending.metrics.len() > 64 {
            let keep: BTreeMap<_, _> = std::mem::take(&mut pending.metrics)
                .into_iter()
                .take(64)
                .collect();
            pending.metrics = keep;
        }
    }

    pub fn take(&mut self) -> Option<Update> {
        self.update.take()
    }

    pub fn is_empty(&self) -> bool {
        self.update.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_protocol_lines_only() {
        let update =
            parse(r#"OVERFLY {"progress":0.42,"metrics":{"loss":0.31,"tiles_done":42}}"#).unwrap();
        assert_eq!(update.progress, Some(0.42));
        assert_eq!(update.metrics["loss"], 0.31);
        assert_eq!(update.metrics["tiles_done"], 42.0);
        assert_eq!(parse("tile 42 done"), None);
        assert_eq!(parse("OVERFLY not json"), None);
        assert_eq!(parse(r#"overfly {"progress":0.1}"#), None);
        assert_eq!(
            parse(r#"OVERFLY {"metrics":{"acc":0.9}}"#)
                .unwrap()
                .progress,
            None
        );
    }

    #[test]
    fn drops_what_the_command_service_would_refuse() {
        let long = "x".repeat(65);
        let line = format!(
            r#"OVERFLY {{"progress":1.5,"metrics":{{"ok":1,"text":"a","":2,"{long}":3}}}}"#
        );
        let update = parse(&line).unwrap();
        assert_eq!(update.progress, Some(1.0));
        assert_eq!(update.metrics.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn pending_updates_merge_latest_values() {
        let mut pending = Pending::default();
        assert!(pending.is_empty());
        pending
            .merge(parse(r#"OVERFLY {"progress":0.1,"metrics":{"loss":0.9,"acc":0.1}}"#).unwrap());
        pending.merge(parse(r#"OVERFLY {"metrics":{"loss":0.5}}"#).unwrap());
        let merged = pending.take().unwrap();
        assert_eq!(merged.progress, Some(0.1));
        assert_eq!(merged.metrics["loss"], 0.5);
        assert_eq!(merged.metrics["acc"], 0.1);
        assert!(pending.take().is_none());
    }
}
