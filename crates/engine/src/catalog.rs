//! Table definitions. Stored as MVCC rows in the catalog B+tree (root page
//! [`CATALOG_ROOT`]), keyed by OID, so DDL is transactional like any other write.

use crate::types::Type;
use serde::{Deserialize, Serialize};

pub const SUPERBLOCK_PAGE: u64 = 0;
pub const CATALOG_ROOT: u64 = 1;
pub const SEQUENCES_ROOT: u64 = 2;
pub const FIRST_FREE_PAGE: u64 = 3;
/// OIDs below this are reserved for built-in objects (as in PostgreSQL).
pub const FIRST_USER_OID: u32 = 16384;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier: varchar/char length, numeric (precision << 16 | scale); -1 = none.
    pub typmod: i32,
    pub not_null: bool,
    /// Default expression as SQL text (parsed when used).
    pub default: Option<String>,
}

impl ColumnDef {
    pub fn ty(&self) -> Type {
        Type::from_oid(self.type_oid).unwrap_or(Type::Text)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckDef {
    pub name: String,
    pub expr: String,
}

/// A secondary index: its own B+tree whose item keys are the order-preserving
/// encoding of the indexed columns followed by the row's clustered key (so every
/// entry is unique, even for equal column values), with the clustered key again as
/// the payload. Entries are never updated in place: a row version whose indexed
/// columns change gets a new entry, old entries stay until VACUUM finds no version
/// of the row with their key, and readers re-check the visible version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexDef {
    pub oid: u32,
    pub name: String,
    pub columns: Vec<usize>,
    pub unique: bool,
    pub primary: bool,
    /// Root page of the index B+tree; 0 = a definition recorded by a version of
    /// Borealis that did not build index trees (never read or maintained).
    pub root: u64,
    /// The index enforces a UNIQUE constraint (dropped with ALTER TABLE ... DROP
    /// CONSTRAINT, not DROP INDEX).
    #[serde(default)]
    pub constraint: bool,
}

impl IndexDef {
    /// Whether the index has a tree that writes maintain and reads may use.
    pub fn is_built(&self) -> bool {
        self.root != 0 && !self.primary
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceDef {
    pub increment: i64,
    pub min_value: i64,
    pub max_value: i64,
    pub start: i64,
    pub cycle: bool,
    /// Column (table oid, column index) that owns this sequence (serial), if any;
    /// [`ROWID_COLUMN`] for a table's hidden row-id sequence.
    pub owned_by: Option<(u32, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelKind {
    Table,
    Sequence,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableDef {
    pub oid: u32,
    pub name: String,
    pub kind: RelKind,
    pub columns: Vec<ColumnDef>,
    /// Primary-key column positions; empty = rows are keyed by a hidden row id
    /// drawn from `rowid_seq`.
    pub pk: Vec<usize>,
    pub pk_name: Option<String>,
    /// Root page of the clustered B+tree (fixed for the table's life).
    pub root: u64,
    pub indexes: Vec<IndexDef>,
    pub checks: Vec<CheckDef>,
    pub rowid_seq: Option<u32>,
    pub sequence: Option<SequenceDef>,
    /// What the last ANALYZE found (None: never analyzed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<TableStats>,
}

/// What ANALYZE learned about a table, for the planner: PostgreSQL's `reltuples`
/// and, per secondary index, the bounds of an equi-depth histogram of its keys (as
/// `pg_stats.histogram_bounds`, but over the index's encoded key, so a resolved
/// index range is compared with them byte-wise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TableStats {
    /// Rows visible to ANALYZE's snapshot.
    pub rows: u64,
    pub histograms: Vec<IndexHistogram>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexHistogram {
    /// The index's oid.
    pub index: u32,
    /// Ascending bounds (the encoded key, cut to `HISTOGRAM_KEY_BYTES`; hex in the
    /// catalog's JSON, decoded once with the entry); each bucket between two
    /// neighbours holds about the same number of rows.
    #[serde(with = "hex_keys")]
    pub bounds: Vec<Vec<u8>>,
}

/// Byte strings as hex strings in the catalog's JSON (a `Vec<u8>` would be an array
/// of numbers, about twice the size).
mod hex_keys {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(keys: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            keys.iter()
                .map(|k| k.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| {
                (0..h.len())
                    .step_by(2)
                    .map(|i| h.get(i..i + 2).and_then(|x| u8::from_str_radix(x, 16).ok()))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| D::Error::custom("histogram bound is not hex"))
            })
            .collect()
    }
}

/// Bytes of an index key kept in a histogram bound: enough to order typical keys,
/// small enough that the statistics stay a small part of the catalog entry.
pub const HISTOGRAM_KEY_BYTES: usize = 16;

/// The "column" that owns a table's hidden row-id sequence (`TableDef::rowid_seq`).
pub const ROWID_COLUMN: usize = usize::MAX;

impl TableDef {
    /// A hidden row-id sequence: internal state, which SQL cannot name (PostgreSQL
    /// has no such object), so nothing can reset or drop it.
    pub fn is_rowid_sequence(&self) -> bool {
        self.sequence
            .as_ref()
            .and_then(|s| s.owned_by)
            .is_some_and(|(_, column)| column == ROWID_COLUMN)
    }

    /// The secondary indexes with trees: the ones row writes maintain.
    pub fn secondary_indexes(&self) -> impl Iterator<Item = &IndexDef> {
        self.indexes.iter().filter(|i| i.is_built())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}
