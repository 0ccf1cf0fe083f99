//! sync-core integration tests, one binary: decoding conformance, identifier syntax, transforms,
//! routing, robustness against hostile frames, and cache path safety.

mod cache_paths;
mod decode;
mod ids_syntax;
mod robustness;
mod route;
mod transform_examples;
