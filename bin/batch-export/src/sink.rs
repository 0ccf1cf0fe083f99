//! Where Parquet files are published: a local directory (temp name, fsync, rename, fsync the
//! directory) or S3 (upload of a local staging file; multipart above a threshold; the SDK's
//! standard retry mode with exponential backoff and jitter).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{Output, S3Checksum, S3Options, S3Sse};

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

/// The export's own folder in the output: `_`-prefixed, so DuckDB hive partitioning, Spark,
/// pyarrow datasets and Athena skip it, and nothing in it ends in `.parquet`.
pub const META_DIR: &str = "_batch_export";

/// 32 lowercase hex characters, as pyarrow's `uuid4().hex` file names.
pub fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Name of the staged (or temp) file of the Parquet file `name`: never ending in `.parquet`, so
/// no `**/*.parquet` glob can pick it up.
pub fn staged_name(name: &str) -> String {
    format!("{name}.staged")
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

/// Whether an S3 bucket keeps the old versions of overwritten objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Versioning {
    /// Never enabled, or a store without versioning: a PUT replaces the only copy.
    Off,
    /// `Enabled` or `Suspended`: older versions of an overwritten object stay readable.
    On(String),
    /// The store would not say (no `s3:GetBucketVersioning` permission, say): why.
    Unknown(String),
}

/// A final location and its staged file.
pub struct Planned {
    pub location: String,
    pub staged: PathBuf,
}

impl Sink {
    pub fn new(output: &Output, s3: &S3Options, state_staging: PathBuf) -> Result<Sink> {
        match output {
            Output::Local(root) => Ok(Sink::Local { root: root.clone() }),
            Output::S3 { bucket, prefix } => Ok(Sink::S3(Box::new(S3Sink::new(
                bucket.clone(),
                prefix.clone(),
                s3.clone(),
                state_staging,
            )?))),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Local { root } => root.display().to_string(),
            Sink::S3(s) => format!("s3://{}/{}", s.bucket, s.prefix),
        }
    }

    /// Where staged files wait for their batch's publication: on the output's file system for
    /// a local output (so publishing is a rename), in the state directory for S3.
    pub fn staging_dir(&self) -> PathBuf {
        match self {
            Sink::Local { root } => root.join(META_DIR).join("staging"),
            Sink::S3(s) => s.staging.clone(),
        }
    }

    /// Chooses the final location and the staged file of a new Parquet file of `table_path` in
    /// `partition_date`.
    pub fn plan(&self, table_path: &str, partition_date: &str) -> Result<Planned> {
        let rel = format!("{table_path}/active/partition_date={partition_date}");
        let name = format!("{}-0.parquet", random_hex());
        let staging = self.staging_dir();
        create_dir_all_durable(&staging)?;
        let location = match self {
            Sink::Local { root } => root.join(&rel).join(&name).to_string_lossy().into_owned(),
            Sink::S3(s) => s.key(&format!("{rel}/{name}")),
        };
        Ok(Planned {
            location,
            staged: staging.join(staged_name(&name)),
        })
    }

    /// The output-relative path of a final location (what manifests record).
    pub fn relative(&self, location: &str) -> String {
        match self {
            Sink::Local { root } => Path::new(location).strip_prefix(root).map_or_else(
                |_| location.to_owned(),
                |p| p.to_string_lossy().into_owned(),
            ),
            Sink::S3(s) => {
                if s.prefix.is_empty() {
                    location.to_owned()
                } else {
                    location
                        .strip_prefix(&format!("{}/", s.prefix))
                        .unwrap_or(location)
                        .to_owned()
                }
            }
        }
    }

    /// Makes a committed batch's staged file visible at its final location. Idempotent (a run
    /// that rolls a batch forward calls it again): a file already published is left as it is.
    /// Returns when the file is durable (local) or the upload is acknowledged (S3). Never
    /// removes or overwrites a published file.
    pub fn publish(&self, staged: &Path, location: &str, recovering: bool) -> Result<()> {
        match self {
            Sink::Local { .. } => {
                let fin = Path::new(location);
                let dir = fin.parent().expect("output has a parent");
                if !staged.exists() {
                    if fin.exists() {
                        return Ok(());
                    }
                    bail!(
                        "the staged file {} of a committed batch is missing and {} was never published",
                        staged.display(),
                        fin.display()
                    );
                }
                create_dir_all_durable(dir)?;
                fs::rename(staged, fin)
                    .with_context(|| format!("renaming to {}", fin.display()))?;
                sync_dir(dir)
                    .with_context(|| format!("fsync of the directory of {}", fin.display()))?;
                if let Some(sdir) = staged.parent() {
                    sync_dir(sdir).with_context(|| format!("fsync of {}", sdir.display()))?;
                }
                Ok(())
            }
            Sink::S3(s) => {
                if recovering {
                    // A killed run may have left an open multipart upload of this key, or have
                    // finished the upload: never upload twice what is already there.
                    s.abort_open_uploads(location);
                    let len = fs::metadata(staged).ok().map(|m| m.len());
                    match (s.head(location)?, len) {
                        (Some(have), Some(want)) if have == want => return Ok(()),
                        (Some(_), None) => return Ok(()),
                        (None, None) => bail!(
                            "the staged file {} of a committed batch is missing and s3://{}/{location} was never published",
                            staged.display(),
                            s.bucket
                        ),
                        _ => {}
                    }
                }
                s.upload(staged, location)
            }
        }
    }

    /// The final location (local path or S3 key) of an output-relative path (what manifests
    /// record): the inverse of [`Sink::relative`].
    pub fn location_of(&self, rel: &str) -> String {
        match self {
            Sink::Local { root } => root.join(rel).to_string_lossy().into_owned(),
            Sink::S3(s) => s.key(rel),
        }
    }

    /// The bytes of a published file (local read, or `GetObject`).
    pub fn read_location(&self, location: &str) -> Result<Vec<u8>> {
        match self {
            Sink::Local { .. } => fs::read(location).with_context(|| format!("reading {location}")),
            Sink::S3(s) => s
                .get(location)?
                .with_context(|| format!("s3://{}/{location} does not exist", s.bucket)),
        }
    }

    /// The consent purge's one exception to "never overwrite": replaces a published file with
    /// its purged version. Locally a rename of the staged file (on the output's file system)
    /// over the old name, then both folders are fsynced: readers see the old or the new file,
    /// never a mix. On S3 a `PutObject` of the same key (atomic per object; no `DeleteObject`).
    /// Idempotent: a local staged file already renamed means done; on S3 the staged file is
    /// kept until the purge is finished, so a replay uploads it again.
    pub fn replace(&self, staged: &Path, location: &str) -> Result<()> {
        match self {
            Sink::Local { .. } => {
                let fin = Path::new(location);
                if !staged.exists() {
                    if fin.exists() {
                        return Ok(());
                    }
                    bail!(
                        "the purged file {} is missing and {} does not exist",
                        staged.display(),
                        fin.display()
                    );
                }
                fs::rename(staged, fin)
                    .with_context(|| format!("renaming over {}", fin.display()))?;
                let dir = fin.parent().expect("output has a parent");
                sync_dir(dir).with_context(|| format!("fsync of {}", dir.display()))?;
                if let Some(sdir) = staged.parent() {
                    sync_dir(sdir).with_context(|| format!("fsync of {}", sdir.display()))?;
                }
                Ok(())
            }
            Sink::S3(s) => {
                if !staged.exists() {
                    bail!(
                        "the purged file {} of a committed purge is missing; s3://{}/{location} \
                         cannot be replaced",
                        staged.display(),
                        s.bucket
                    );
                }
                s.upload(staged, location)
            }
        }
    }

    /// Where purged files wait for their purge's commit: on the output's file system for a
    /// local output (replacing is a rename), in the state directory for S3.
    pub fn purge_staging_dir(&self) -> PathBuf {
        match self {
            Sink::Local { root } => root.join(META_DIR).join("purge-staging"),
            Sink::S3(s) => s
                .staging
                .parent()
                .map_or_else(|| s.staging.clone(), |p| p.join("purge-staging")),
        }
    }

    /// Removes a staged file after its batch is marked published (S3; a local staged file was
    /// renamed away).
    pub fn discard_staged(&self, staged: &Path) -> Result<()> {
        remove_if_exists(staged).with_context(|| format!("removing {}", staged.display()))
    }

    /// Removes every file left in the staging folder: called after every committed batch was
    /// rolled forward, so what is left belongs to batches killed before their commit point, which
    /// were never visible to anyone.
    pub fn clean_staging(&self) -> Result<usize> {
        let dir = self.staging_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut n = 0;
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                remove_if_exists(&e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes `bytes` to `<output>/_batch_export/<rel>` (a manifest or a keys object): durable
    /// (local: temp file, fsync, rename, fsync the folder) or acknowledged (S3).
    pub fn put_meta(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        match self {
            Sink::Local { root } => {
                let path = root.join(META_DIR).join(rel);
                let dir = path.parent().expect("meta path has a parent");
                create_dir_all_durable(dir)?;
                let tmp = dir.join(format!(".tmp-{}", random_hex()));
                write_synced(&tmp, bytes)?;
                fs::rename(&tmp, &path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                sync_dir(dir).with_context(|| format!("fsync of {}", dir.display()))?;
                Ok(())
            }
            Sink::S3(s) => s
                .put_bytes(&s.key(&format!("{META_DIR}/{rel}")), bytes, false)
                .map(|_| ()),
        }
    }

    /// Creates `<output>/_batch_export/<rel>` only if nothing is there yet: `link(2)` of a
    /// complete, fsynced temp file (fails like `O_EXCL` when the name exists, and the name never
    /// shows a partial file), or a conditional PUT (`If-None-Match: *`). `false` when the name
    /// was taken.
    pub fn create_meta(&self, rel: &str, bytes: &[u8]) -> Result<bool> {
        match self {
            Sink::Local { root } => {
                let path = root.join(META_DIR).join(rel);
                let dir = path.parent().expect("meta path has a parent");
                create_dir_all_durable(dir)?;
                let tmp = dir.join(format!(".tmp-{}", random_hex()));
                write_synced(&tmp, bytes)?;
                let linked = fs::hard_link(&tmp, &path);
                remove_if_exists(&tmp)?;
                match linked {
                    Ok(()) => {
                        sync_dir(dir).with_context(|| format!("fsync of {}", dir.display()))?;
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
                }
            }
            Sink::S3(s) => s.put_bytes(&s.key(&format!("{META_DIR}/{rel}")), bytes, true),
        }
    }

    /// Reads `<output>/_batch_export/<rel>`; `None` when it does not exist.
    pub fn get_meta(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Sink::Local { root } => {
                let path = root.join(META_DIR).join(rel);
                match fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
            Sink::S3(s) => s.get(&s.key(&format!("{META_DIR}/{rel}"))),
        }
    }

    /// Output-relative paths of every `*.parquet` file of the output outside
    /// `_batch_export/` (published files; staged ones never end in `.parquet`), sorted.
    pub fn list_parquet(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        match self {
            Sink::Local { root } => {
                let mut stack = vec![root.clone()];
                while let Some(dir) = stack.pop() {
                    let entries = match fs::read_dir(&dir) {
                        Ok(entries) => entries,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(e).with_context(|| format!("listing {}", dir.display()))
                        }
                    };
                    for entry in entries {
                        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
                        let path = entry.path();
                        let rel = path
                            .strip_prefix(root)
                            .expect("under the root")
                            .to_string_lossy()
                            .into_owned();
                        if entry.file_type()?.is_dir() {
                            if rel != META_DIR {
                                stack.push(path);
                            }
                        } else if rel.ends_with(".parquet") {
                            out.push(rel);
                        }
                    }
                }
            }
            Sink::S3(s) => {
                let prefix = s.key("");
                for key in s.list_keys(&prefix, None)? {
                    let rel = key.strip_prefix(&prefix).unwrap_or(&key);
                    if rel.ends_with(".parquet") && !rel.starts_with(&format!("{META_DIR}/")) {
                        out.push(rel.to_owned());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Names (not paths) in `<output>/_batch_export/<dir>/`, sorted, after `start_after` if
    /// given (S3 lists in that order natively, so a run asks only for what is newer).
    pub fn list_meta(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<String>> {
        let mut names = match self {
            Sink::Local { root } => {
                let path = root.join(META_DIR).join(dir);
                match fs::read_dir(&path) {
                    Ok(entries) => entries
                        .filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| !n.starts_with('.'))
                        .collect(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
                }
            }
            Sink::S3(s) => s.list(&s.key(&format!("{META_DIR}/{dir}/")), start_after)?,
        };
        names.sort();
        if let Some(after) = start_after {
            names.retain(|n| n.as_str() > after);
        }
        Ok(names)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok(())
}

/// `create_dir_all`, then fsync the parent of every directory it created.
pub(crate) fn create_dir_all_durable(dir: &Path) -> Result<()> {
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
            if opts.checksum == S3Checksum::WhenRequired {
                use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
                b = b
                    .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                    .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            }
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
                        .set_server_side_encryption(self.sse())
                        .set_ssekms_key_id(self.opts.kms_key_id.clone())
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
            .set_server_side_encryption(self.sse())
            .set_ssekms_key_id(self.opts.kms_key_id.clone())
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

    fn sse(&self) -> Option<aws_sdk_s3::types::ServerSideEncryption> {
        use aws_sdk_s3::types::ServerSideEncryption;
        self.opts.sse.map(|s| match s {
            S3Sse::AwsKms => ServerSideEncryption::AwsKms,
            S3Sse::Aes256 => ServerSideEncryption::Aes256,
        })
    }

    /// `prefix/rel` (or `rel` without a prefix).
    fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_owned()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// Whether the bucket keeps the old versions of overwritten objects.
    pub fn versioning(&self) -> Versioning {
        use aws_sdk_s3::error::ProvideErrorMetadata;
        self.rt.block_on(async {
            match self
                .client
                .get_bucket_versioning()
                .bucket(&self.bucket)
                .send()
                .await
            {
                // No status: versioning was never enabled, a PUT replaces the only copy.
                Ok(out) => match out.status() {
                    None => Versioning::Off,
                    Some(status) => Versioning::On(status.as_str().to_owned()),
                },
                // A store without versioning (s3s-fs, for one) cannot keep old versions.
                Err(e)
                    if e.code() == Some("NotImplemented")
                        || e.raw_response().is_some_and(|r| r.status().as_u16() == 501) =>
                {
                    Versioning::Off
                }
                Err(e) => Versioning::Unknown(format!(
                    "GetBucketVersioning s3://{}: {:#}",
                    self.bucket,
                    sdk_err(e)
                )),
            }
        })
    }

    /// The version ids of `key`'s versions that are not its current one (delete markers, which
    /// hold no data, left out).
    pub fn noncurrent_versions(&self, key: &str) -> Result<Vec<String>> {
        Ok(self
            .noncurrent_versions_under(key)?
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect())
    }

    /// `(key, version id)` of every version under `prefix` that the store says is not current
    /// (`IsLatest` false: a version whose answer lacks the field is never taken for an old one).
    pub fn noncurrent_versions_under(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.rt
            .block_on(async {
                let mut ids = Vec::new();
                let mut key_marker: Option<String> = None;
                let mut version_marker: Option<String> = None;
                loop {
                    let page = self
                        .client
                        .list_object_versions()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .set_key_marker(key_marker.clone())
                        .set_version_id_marker(version_marker.clone())
                        .send()
                        .await
                        .map_err(sdk_err)?;
                    ids.extend(
                        page.versions()
                            .iter()
                            .filter(|v| v.is_latest() == Some(false))
                            .filter_map(|v| {
                                Some((v.key()?.to_owned(), v.version_id()?.to_owned()))
                            }),
                    );
                    if page.is_truncated() != Some(true) {
                        break;
                    }
                    key_marker = page.next_key_marker().map(str::to_owned);
                    version_marker = page.next_version_id_marker().map(str::to_owned);
                    if key_marker.is_none() {
                        break;
                    }
                }
                Ok::<_, anyhow::Error>(ids)
            })
            .with_context(|| format!("ListObjectVersions s3://{}/{prefix}", self.bucket))
    }

    /// Deletes one old version of `key` (`DeleteObject` with its version id: the current
    /// object is not touched).
    pub fn delete_version(&self, key: &str, version_id: &str) -> Result<()> {
        self.rt
            .block_on(async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .version_id(version_id)
                    .send()
                    .await
                    .map_err(sdk_err)
            })
            .with_context(|| {
                format!(
                    "DeleteObject s3://{}/{key} (version {version_id})",
                    self.bucket
                )
            })?;
        Ok(())
    }

    /// Aborts open multipart uploads of `key` (a killed run's), best effort: they hold parts,
    /// never a visible object.
    fn abort_open_uploads(&self, key: &str) {
        self.rt.block_on(async {
            let Ok(list) = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(key)
                .send()
                .await
            else {
                return;
            };
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
        })
    }

    /// The size of `key`, `None` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<u64>> {
        self.rt
            .block_on(async {
                match self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(h) => Ok(Some(h.content_length().unwrap_or(0).max(0) as u64)),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
                    Err(e) => Err(sdk_err(e)),
                }
            })
            .with_context(|| format!("HeadObject s3://{}/{key}", self.bucket))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.rt
            .block_on(async {
                match self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(o) => {
                        let body = o.body.collect().await.context("reading the object")?;
                        Ok(Some(body.into_bytes().to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(sdk_err(e)),
                }
            })
            .with_context(|| format!("GetObject s3://{}/{key}", self.bucket))
    }

    /// PutObject of a small object; `if_absent` makes it conditional (`If-None-Match: *`) and
    /// returns `false` when the key exists (412).
    fn put_bytes(&self, key: &str, bytes: &[u8], if_absent: bool) -> Result<bool> {
        self.rt
            .block_on(async {
                let mut req = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .content_length(bytes.len() as i64)
                    .body(aws_sdk_s3::primitives::ByteStream::from(bytes.to_vec()))
                    .set_server_side_encryption(self.sse())
                    .set_ssekms_key_id(self.opts.kms_key_id.clone());
                if if_absent {
                    req = req.if_none_match("*");
                }
                match req.send().await {
                    Ok(_) => Ok(true),
                    Err(e)
                        if if_absent
                            && e.raw_response().is_some_and(|r| r.status().as_u16() == 412) =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(sdk_err(e)),
                }
            })
            .with_context(|| format!("PutObject s3://{}/{key}", self.bucket))
    }

    /// Every key under `prefix` (all levels), after the key `start_after` if given.
    fn list_keys(&self, prefix: &str, start_after: Option<String>) -> Result<Vec<String>> {
        self.rt
            .block_on(async {
                let mut keys = Vec::new();
                let mut token: Option<String> = None;
                loop {
                    let page = self
                        .client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .set_start_after(start_after.clone())
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(sdk_err)?;
                    keys.extend(
                        page.contents()
                            .iter()
                            .filter_map(|o| o.key().map(str::to_owned)),
                    );
                    match page.next_continuation_token() {
                        Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                        _ => break,
                    }
                }
                Ok::<_, anyhow::Error>(keys)
            })
            .with_context(|| format!("ListObjectsV2 s3://{}/{prefix}", self.bucket))
    }

    /// Names under `dir` (a key prefix ending in `/`), after `start_after` (a name).
    fn list(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<String>> {
        let keys = self.list_keys(dir, start_after.map(|after| format!("{dir}{after}")))?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(dir))
            .filter(|name| !name.contains('/'))
            .map(str::to_owned)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_never_match_parquet_globs_and_publishing_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Sink::Local {
            root: tmp.path().to_owned(),
        };
        let p = sink
            .plan("study_user_activity/create/post", "2024-10-02")
            .unwrap();
        let staged = p.staged.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(!staged.ends_with(".parquet"), "{staged}");
        assert!(p.staged.starts_with(tmp.path().join(META_DIR)));
        assert!(p.location.ends_with("-0.parquet"));
        fs::write(&p.staged, b"parquet bytes").unwrap();
        sink.publish(&p.staged, &p.location, false).unwrap();
        assert_eq!(fs::read(&p.location).unwrap(), b"parquet bytes");
        // Rolled forward again (a crash right after the rename): nothing changes.
        sink.publish(&p.staged, &p.location, true).unwrap();
        assert_eq!(fs::read(&p.location).unwrap(), b"parquet bytes");
        // A committed batch whose staged file vanished is an error, never silence.
        let lost = sink
            .plan("study_user_activity/create/post", "2024-10-02")
            .unwrap();
        assert!(sink.publish(&lost.staged, &lost.location, true).is_err());
    }

    #[test]
    fn meta_objects_are_created_once() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Sink::Local {
            root: tmp.path().to_owned(),
        };
        assert!(sink.create_meta("owner.json", b"a").unwrap());
        assert!(!sink.create_meta("owner.json", b"b").unwrap());
        assert_eq!(sink.get_meta("owner.json").unwrap().unwrap(), b"a");
        assert_eq!(sink.get_meta("none.json").unwrap(), None);
        sink.put_meta("batches/000000000002.json", b"2").unwrap();
        sink.put_meta("batches/000000000001.json", b"1").unwrap();
        assert_eq!(
            sink.list_meta("batches", None).unwrap(),
            ["000000000001.json", "000000000002.json"]
        );
        assert_eq!(
            sink.list_meta("batches", Some("000000000001.json"))
                .unwrap(),
            ["000000000002.json"]
        );
    }
}
