//! Typed rows to a Polars `DataFrame` (columns built directly from the declared schema, never
//! inferred) and the `DataFrame` to a Parquet file on disk (fsynced).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context as _, Result};
use polars::prelude::{
    BooleanChunkedBuilder, ChunkedBuilder, Column, DataFrame, Int64Type, IntoColumn, IntoSeries,
    KeyValueMetadata, ParquetCompression, ParquetWriter, PlSmallStr, PrimitiveChunkedBuilder,
    StringChunkedBuilder,
};
use rayon::prelude::*;

use crate::config::Compression;
use crate::tables::{Cell, ColType, TableDef};

fn build_column(name: &str, ty: ColType, index: usize, rows: &[Vec<Cell>]) -> Result<Column> {
    let name = PlSmallStr::from_str(name);
    let bad = |cell: &Cell| anyhow::anyhow!("column {name}: {cell:?} is not a {}", ty.name());
    let series = match ty {
        ColType::Str => {
            let mut b = StringChunkedBuilder::new(name.clone(), rows.len());
            for row in rows {
                match &row[index] {
                    Cell::Null => b.append_null(),
                    Cell::Str(s) => b.append_value(&**s),
                    other => return Err(bad(other)),
                }
            }
            b.finish().into_series()
        }
        ColType::I64 => {
            let mut b = PrimitiveChunkedBuilder::<Int64Type>::new(name.clone(), rows.len());
            for row in rows {
                match &row[index] {
                    Cell::Null => b.append_null(),
                    Cell::I64(v) => b.append_value(*v),
                    other => return Err(bad(other)),
                }
            }
            b.finish().into_series()
        }
        ColType::Bool => {
            let mut b = BooleanChunkedBuilder::new(name.clone(), rows.len());
            for row in rows {
                match &row[index] {
                    Cell::Null => b.append_null(),
                    Cell::Bool(v) => b.append_value(*v),
                    other => return Err(bad(other)),
                }
            }
            b.finish().into_series()
        }
    };
    Ok(series.into_column())
}

/// Builds the table's `DataFrame` (column order and types from `def`), columns in parallel.
pub fn build_frame(def: &TableDef, rows: &[Vec<Cell>]) -> Result<DataFrame> {
    let columns = def
        .columns
        .par_iter()
        .enumerate()
        .map(|(i, (name, ty))| build_column(name, *ty, i, rows))
        .collect::<Result<Vec<Column>>>()?;
    DataFrame::new(rows.len(), columns).context("building the DataFrame")
}

fn codec(c: Compression) -> ParquetCompression {
    match c {
        Compression::Zstd => ParquetCompression::Zstd(None),
        Compression::Snappy => ParquetCompression::Snappy,
        Compression::None => ParquetCompression::Uncompressed,
    }
}

/// The `ARROW:schema` hint stored in the file: plain `string` (Arrow `Utf8`), `int64`, `bool`
/// columns, as pyarrow and the predecessor wrote. Without it Polars records `string_view`, which
/// pyarrow would then hand to readers instead of `string`.
fn arrow_schema_hint(def: &TableDef) -> KeyValueMetadata {
    use polars_arrow::datatypes::{ArrowDataType, ArrowSchema, Field};
    let schema: ArrowSchema = def
        .columns
        .iter()
        .map(|(name, ty)| {
            let name = PlSmallStr::from_str(name);
            let dtype = match ty {
                ColType::Str => ArrowDataType::Utf8,
                ColType::I64 => ArrowDataType::Int64,
                ColType::Bool => ArrowDataType::Boolean,
            };
            (name.clone(), Field::new(name, dtype, true))
        })
        .collect();
    let kv = polars_parquet::write::schema_to_metadata_key(&schema);
    KeyValueMetadata::from_static(vec![(kv.key, kv.value.unwrap_or_default())])
}

/// Writes `df` to `path` (created or truncated) and fsyncs it. Returns the file size.
pub fn write_parquet(
    df: &mut DataFrame,
    def: &TableDef,
    path: &Path,
    compression: Compression,
) -> Result<u64> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    ParquetWriter::new(&mut w)
        .with_compression(codec(compression))
        .with_key_value_metadata(Some(arrow_schema_hint(def)))
        .finish(df)
        .with_context(|| format!("writing {}", path.display()))?;
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .context("flushing the Parquet file")?;
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok(file.metadata()?.len())
}
