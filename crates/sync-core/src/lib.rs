//! Pure core of the firehose sync service: bytes in, typed events out; event in, routing decisions out.
//!
//! Nothing in this crate touches the network, and only [`cache`] touches the file system (it is the
//! cache writer, the one I/O edge that lives here so the writer binary and tests share it).

pub mod cache;
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
pub mod route;
pub mod synth;
pub mod time;
pub mod transform;
pub mod validate;
pub mod verify;
