//! Writes a looped copy of a capture (unique seq, repo, rev per loop) for benchmarks:
//! `cargo run --release -p sync-core --example loop_capture -- IN OUT FRAMES`.

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (input, output) = (&args[1], &args[2]);
    let total: usize = args[3].parse().expect("FRAMES");
    let data = std::fs::read(input).expect("read capture");
    let raw: Vec<&[u8]> = sync_core::frame::capture_frames(&data)
        .map(|f| f.expect("frame"))
        .collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(output).expect("create output"));
    for frame in sync_core::synth::LoopedCapture::new(&raw, 1).take(total) {
        out.write_all(&(frame.len() as u32).to_le_bytes()).unwrap();
        out.write_all(&frame).unwrap();
    }
    out.flush().unwrap();
}
