//! Arbitrary bytes as a `getRepo` CAR, pushed in two chunks (split where the first byte says, so
//! chunk boundaries land everywhere): every block hash-checked, the commit object checked, the
//! MST walked. Nothing may panic, overflow or run away.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::ids::Did;
use sync_core::repo::RepoReader;
use sync_core::verify::VerifyOptions;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut reader = RepoReader::new(8 << 20);
    if reader.push(&data[..split]).is_err() || reader.push(&data[split..]).is_err() {
        return;
    }
    let did = Did::parse("did:plc:53iucmf5ldftgqyf2ac7hmhd").expect("valid DID");
    let opts = VerifyOptions::at(1_783_175_954_000_000);
    match reader.finish_unsigned(&did, &opts) {
        Ok(repo) => {
            for record in &repo.records {
                let _ = repo.record_json(record);
            }
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
