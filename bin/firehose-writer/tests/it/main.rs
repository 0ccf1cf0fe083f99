//! firehose-writer integration tests, one binary: `inspect` CLI, the writer in-process against
//! the replay file and the test relay (faults), as a process (SIGKILL crash safety, signals), and
//! against the official atproto PDS.

mod cli;
mod pds;
mod process;
mod writer;
