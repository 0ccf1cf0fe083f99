//! firehose-writer library: the commands the binary runs, callable in-process by tests.
//!
//! `inspect` prints a capture as Jetstream-v1-shaped JSON lines. The long-running writer
//! (socket, state store, cursor) is tracked in issue 3 and not built yet.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use sync_core::frame::{capture_frames, decode_frame};
use sync_core::jetstream::event_lines;

/// Counts reported by [`inspect`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InspectSummary {
    pub frames: u64,
    pub lines: u64,
    pub invalid_frames: u64,
}

/// Reads a capture (`[u32 LE length][frame]...`) and writes one JSON line per event to `out`.
///
/// A frame that does not decode becomes a `{"kind": "invalid_frame", ...}` line and the rest of
/// the capture is still printed; a truncated capture is an error after everything readable.
pub fn inspect(capture: &Path, out: &mut dyn Write) -> Result<InspectSummary> {
    let data = std::fs::read(capture)
        .with_context(|| format!("reading capture {}", capture.display()))?;
    let mut summary = InspectSummary::default();
    for (index, frame) in capture_frames(&data).enumerate() {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                out.flush()?;
                return Err(e).with_context(|| {
                    format!(
                        "capture {} is truncated after {} frames",
                        capture.display(),
                        summary.frames
                    )
                });
            }
        };
        summary.frames += 1;
        let lines = match decode_frame(frame) {
            Ok(event) => event_lines(&event),
            Err(e) => {
                summary.invalid_frames += 1;
                vec![serde_json::json!({
                    "kind": "invalid_frame",
                    "frame_index": index,
                    "reason": e.reason(),
                    "error": e.to_string(),
                })]
            }
        };
        for line in lines {
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")?;
            summary.lines += 1;
        }
    }
    out.flush()?;
    Ok(summary)
}
