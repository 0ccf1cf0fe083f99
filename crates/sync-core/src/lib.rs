//! Pure core of the firehose sync service: bytes in, typed events out; event in, routing decisions out.
//!
//! Nothing in this crate touches the network or the file system: the cache writer lives in the
//! writer binary (`firehose_writer::cache`). The test-data generators (`synth`) are compiled only
//! with the `synth` feature, which tests and benchmarks enable. No `unsafe` (forbidden below),
//! and `.ci/run` checks the crate without `synth`.

#![forbid(unsafe_code)]

pub mod car;
pub mod cbor;
pub mod chain;
pub mod crypto;
pub mod did_doc;
pub mod frame;
pub mod ids;
pub mod jetstream;
pub mod mst;
pub mod paths;
pub mod pyjson;
pub mod records;
pub mod repo;
pub mod resync;
pub mod route;
#[cfg(feature = "synth")]
pub mod synth;
pub mod time;
pub mod transform;
pub mod validate;
pub mod verify;
