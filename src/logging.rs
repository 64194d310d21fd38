//! How ranks and the launcher log: everything goes through `tracing`.
//!
//! For a person (`--log-format text`, the default) an INFO event prints
//! its message and nothing else, on stdout, and a warning or error on
//! stderr, so the lines read exactly as they always did and the
//! launcher's `[r0 orch]` tags stay the only decoration. Span timings
//! (window, stage pass, all-reduce, audit, checkpoint) and DEBUG events
//! appear in tracing's usual format on stderr when `RUST_LOG` asks for
//! them.
//!
//! For a machine (`--log-format json`) every event and every closed span
//! is one JSON object on stdout, with its fields and the spans it is in
//! (the outermost is `rank{rank, role}`), so one parser reads the whole
//! job. Either way `RUST_LOG` filters in `tracing_subscriber::EnvFilter`'s
//! syntax (`info`, `swarmrun::roles=debug,warn`); the default is `info`.

use std::fmt;
use std::io;

use clap::ValueEnum;
use thiserror::Error;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FmtSpan, Writer};
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The environment variable that carries `--log-format` to the ranks a
/// launcher starts (and that `mpirun -x` or `srun --export` can carry).
pub const FORMAT_ENV: &str = "SWARMRUN_LOG_FORMAT";

/// Who reads the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// A person: the lines as printed, tagged by the launcher.
    #[default]
    Text,
    /// A machine: one JSON object per event or closed span.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    /// The format this process was started with ([`FORMAT_ENV`], which
    /// `swarmrun --log-format` sets for itself and the ranks it starts).
    pub fn of_process() -> LogFormat {
        match std::env::var(FORMAT_ENV).as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoggingError {
    #[error("RUST_LOG: {0}")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    #[error("a logger is already installed")]
    Installed,
}

/// Installs the process's logger.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let asked = std::env::var_os(EnvFilter::DEFAULT_ENV).is_some();
    let filter = EnvFilter::builder()
        .with_default_directive(Level::INFO.into())
        .from_env()?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match format {
        LogFormat::Text => builder
            .with_span_events(if asked { FmtSpan::CLOSE } else { FmtSpan::NONE })
            .event_format(PersonFormat::default())
            .with_writer(io::stdout.with_filter(is_a_line).or_else(io::stderr))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_span_events(FmtSpan::CLOSE)
            .with_writer(io::stdout)
            .try_init(),
    };
    installed.map_err(|_| LoggingError::Installed)
}

/// Whether an event is one of a person's lines: INFO, not a span's
/// timing. (Warnings and errors are lines too, for stderr.)
fn is_a_line(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == Level::INFO && !meta.is_span()
}

/// Prints a line's message alone, and anything else in tracing's full
/// format.
#[derive(Default)]
struct PersonFormat {
    full: format::Format,
}

impl<S, N> FormatEvent<S, N> for PersonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if *meta.level() > Level::INFO || meta.is_span() {
            return self.full.format_event(ctx, writer, event);
        }
        let mut message = Message(None);
        event.record(&mut message);
        match message.0 {
            Some(text) => writeln!(writer, "{text}"),
            None => self.full.format_event(ctx, writer, event),
        }
    }
}

/// The `message` field of an event.
struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// One line of a rank's output as the launcher relays it in JSON mode:
/// the rank's own JSON objects pass as they are; anything else (a panic,
/// a library's print) is wrapped, so every line stays one JSON object.
pub fn relayed_json_line(label: &str, stream: &str, line: &str) -> String {
    if line.starts_with('{') && serde_json::from_str::<serde_json::Value>(line).is_ok() {
        return line.to_string();
    }
    serde_json::json!({
        "level": if stream == "stderr" { "WARN" } else { "INFO" },
        "fields": { "message": line },
        "target": "swarmrun::launch::relay",
        "label": label,
        "stream": stream,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_that_is_not_json_is_wrapped_and_json_passes_as_it_is() {
        let own = r#"{"level":"INFO","fields":{"message":"window 3"}}"#;
        assert_eq!(relayed_json_line("r0 orch", "stdout", own), own);
        let wrapped = relayed_json_line("r2 s0", "stderr", "thread 'main' panicked at {x}");
        let v: serde_json::Value = serde_json::from_str(&wrapped).unwrap();
        assert_eq!(v["fields"]["message"], "thread 'main' panicked at {x}");
        assert_eq!(
            (v["label"].as_str(), v["level"].as_str()),
            (Some("r2 s0"), Some("WARN"))
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&relayed_json_line(
                "r1",
                "stdout",
                "{not json"
            ))
            .is_ok()
        );
    }
}
