//! Where Parquet files are published: a local directory (temp name, fsync, rename, fsync the
//! directory) or S3 (upload of a local staging file; multipart above a threshold; the SDK's
//! standard retry mode with exponential backoff and jitter).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{Output, S3Options};
use crate::state::PlannedOutput;

pub enum Sink {
    Local { root: PathBuf },
    S3(Box<S3Sink>),
}

pub struct S3Sink {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    opts: S3Options,
    staging: PathBuf,
}

/// 32 lowercase hex characters, as pyarrow's `uuid4().hex` file names.
pub fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Name of the temp (local) or staging (S3) file of the Parquet file `name`: hidden, and not
/// ending in `.parquet`.
pub fn temp_name(name: &str) -> String {
    format!(".tmp-{name}.partial")
}

/// fsyncs a directory so a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Sink {
    pub fn new(output: &Output, s3: &S3Options, staging: PathBuf) -> Result<Sink> {
        match output {
            Output::Local(root) => Ok(Sink::Local { root: root.clone() }),
            Output::S3 { bucket, prefix } => Ok(Sink::S3(Box::new(S3Sink::new(
                bucket.clone(),
                prefix.clone(),
                s3.clone(),
                staging,
            )?))),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Local { root } => root.display().to_string(),
            Sink::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
        }
    }

    /// Chooses the final and temporary locations of a new Parquet file of `table_path` in
    /// `partition_date`, creating local directories as needed.
    pub fn plan(&self, table_path: &str, partition_date: &str) -> Result<PlannedOutput> {
        let rel = format!("{table_path}/active/partition_date={partition_date}");
        let name = format!("{}-0.parquet", random_hex());
        match self {
            Sink::Local { root } => {
                let dir = root.join(&rel);
                create_dir_all_durable(&dir)?;
                // The temp file sits in the live partition folder, so its name must not end in
                // `.parquet`: readers glob `**/*.parquet` (DuckDB, Polars, Spark) and would pick
                // up a half-written or never-committed file. Rollback removes the temp path the
                // journal recorded, so temps of older runs (`.tmp-<name>`) are still found.
                Ok(PlannedOutput {
                    location: dir.join(&name).to_string_lossy().into_owned(),
                    temp: dir.join(temp_name(&name)),
                })
            }
            Sink::S3(s) => {
                fs::create_dir_all(&s.staging)
                    .with_context(|| format!("creating {}", s.staging.display()))?;
                let key = if s.prefix.is_empty() {
                    format!("{rel}/{name}")
                } else {
                    format!("{}/{rel}/{name}", s.prefix)
                };
                Ok(PlannedOutput {
                    location: key,
                    temp: s.staging.join(temp_name(&name)),
                })
            }
        }
    }

    /// Makes a written, fsynced temp file visible at its final location. Returns when the file is
    /// durable (local) or the upload is acknowledged (S3).
    pub fn publish(&self, out: &PlannedOutput) -> Result<()> {
        match self {
            Sink::Local { .. } => {
                let fin = Path::new(&out.location);
                fs::rename(&out.temp, fin)
                    .with_context(|| format!("renaming to {}", fin.display()))?;
                sync_dir(fin.parent().expect("output has a parent"))
                    .with_context(|| format!("fsync of the directory of {}", fin.display()))?;
                Ok(())
            }
            Sink::S3(s) => {
                s.upload(&out.temp, &out.location)?;
                remove_if_exists(&out.temp)
                    .with_context(|| format!("removing {}", out.temp.display()))?;
                Ok(())
            }
        }
    }

    /// Rollback of an output of a batch killed before its commit point.
    pub fn remove(&self, out: &PlannedOutput) -> Result<()> {
        remove_if_exists(&out.temp).with_context(|| format!("removing {}", out.temp.display()))?;
        match self {
            Sink::Local { .. } => {
                let fin = Path::new(&out.location);
                remove_if_exists(fin).with_context(|| format!("removing {}", fin.display()))?;
                if let Some(dir) = fin.parent() {
                    if dir.exists() {
                        sync_dir(dir)?;
                    }
                }
                Ok(())
            }
            Sink::S3(s) => s.delete(&out.location),
        }
    }
}

/// `create_dir_all`, then fsync the parent of every directory it created.
fn create_dir_all_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.is_dir() {
            break;
        }
        missing.push(d.to_owned());
        cur = d.parent();
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for d in missing {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).with_context(|| format!("fsync of {}", parent.display()))?;
        }
    }
    Ok(())
}

fn sdk_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> anyhow::Error {
    // The SDK's Display is terse ("service error"); the Debug form names the cause.
    anyhow::anyhow!("{}: {:?}", e, e)
}

impl S3Sink {
    fn new(bucket: String, prefix: String, opts: S3Options, staging: PathBuf) -> Result<S3Sink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let client = rt.block_on(async {
            use aws_config::retry::RetryConfig;
            use aws_config::timeout::TimeoutConfig;
            use aws_config::{BehaviorVersion, Region};
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .retry_config(RetryConfig::standard().with_max_attempts(opts.max_attempts))
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(std::time::Duration::from_secs(10))
                        .read_timeout(std::time::Duration::from_secs(120))
                        .build(),
                );
            if let Some(region) = &opts.region {
                loader = loader.region(Region::new(region.clone()));
            }
            let sdk = loader.load().await;
            let mut b = aws_sdk_s3::config::Builder::from(&sdk);
            if sdk.region().is_none() {
                b = b.region(Region::new("us-east-1"));
            }
            if let Some(ep) = &opts.endpoint {
                b = b.endpoint_url(ep);
            }
            b = b.force_path_style(opts.path_style);
            aws_sdk_s3::Client::from_conf(b.build())
        });
        Ok(S3Sink {
            rt,
            client,
            bucket,
            prefix,
            opts,
            staging,
        })
    }

    fn upload(&self, file: &Path, key: &str) -> Result<()> {
        let len = fs::metadata(file)
            .with_context(|| format!("stat {}", file.display()))?
            .len();
        self.rt
            .block_on(async {
                if len > self.opts.multipart_threshold {
                    self.multipart(file, key, len).await
                } else {
                    let body = aws_sdk_s3::primitives::ByteStream::from_path(file)
                        .await
                        .context("reading the staging file")?;
                    self.client
                        .put_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .content_length(len as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(sdk_err)?;
                    Ok(())
                }
            })
            .with_context(|| format!("uploading s3://{}/{key}", self.bucket))
    }

    async fn multipart(&self, file: &Path, key: &str, len: u64) -> Result<()> {
        use aws_sdk_s3::primitives::{ByteStream, Length};
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(sdk_err)?;
        let Some(upload_id) = created.upload_id() else {
            bail!("CreateMultipartUpload returned no upload id");
        };
        let result: Result<()> = async {
            let mut parts = Vec::new();
            let mut offset = 0u64;
            let mut number = 1i32;
            while offset < len {
                let size = self.opts.part_size.min(len - offset);
                let body = ByteStream::read_from()
                    .path(file)
                    .offset(offset)
                    .length(Length::Exact(size))
                    .build()
                    .await
                    .context("reading a part of the staging file")?;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(size as i64)
                    .body(body)
                    .send()
                    .await
                    .map_err(sdk_err)?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(part.e_tag().map(str::to_owned))
                        .build(),
                );
                offset += size;
                number += 1;
            }
            let part_count = parts.len();
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await;
            if let Err(e) = completed {
                // Some S3-compatible stores answer 200 with a body the SDK cannot parse (moto
                // names the root element differently): trust the object only if it is there
                // with the full size.
                let head = self.client.head_object().bucket(&self.bucket).key(key).send().await;
                match head {
                    Ok(h) if h.content_length() == Some(len as i64) => {
                        tracing::warn!(key, error = %e, "CompleteMultipartUpload answer not understood; object verified with HeadObject");
                    }
                    _ => return Err(sdk_err(e)),
                }
            }
            // The tests read this line to know the multipart path really sent several parts.
            tracing::debug!(key, parts = part_count, bytes = len, "multipart upload completed");
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
        }
        result
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.rt
            .block_on(async {
                // A multipart upload a killed run left open would otherwise keep its parts.
                if let Ok(list) = self
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(key)
                    .send()
                    .await
                {
                    for u in list.uploads() {
                        if u.key() == Some(key) {
                            if let Some(id) = u.upload_id() {
                                let _ = self
                                    .client
                                    .abort_multipart_upload()
                                    .bucket(&self.bucket)
                                    .key(key)
                                    .upload_id(id)
                                    .send()
                                    .await;
                            }
                        }
                    }
                }
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(sdk_err)?;
                Ok::<(), anyhow::Error>(())
            })
            .with_context(|| format!("deleting s3://{}/{key}", self.bucket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_never_match_parquet_globs_and_old_temps_roll_back() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Sink::Local {
            root: tmp.path().to_owned(),
        };
        let out = sink
            .plan("study_user_activity/create/post", "2024-10-02")
            .unwrap();
        let temp = out.temp.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            temp.starts_with(".tmp-") && !temp.ends_with(".parquet"),
            "{temp}"
        );
        assert!(out.location.ends_with("-0.parquet"));
        assert_eq!(out.temp.parent(), Path::new(&out.location).parent());

        // A journal written before this change recorded `.tmp-<name>`: rollback removes
        // exactly what the journal recorded.
        let name = Path::new(&out.location)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        let old = PlannedOutput {
            location: out.location.clone(),
            temp: out.temp.with_file_name(format!(".tmp-{name}")),
        };
        fs::write(&old.temp, b"half written").unwrap();
        fs::write(&old.location, b"published").unwrap();
        sink.remove(&old).unwrap();
        assert!(!old.temp.exists() && !Path::new(&old.location).exists());
        // And the new temp name.
        fs::write(&out.temp, b"half written").unwrap();
        sink.remove(&out).unwrap();
        assert!(!out.temp.exists());
    }
}
