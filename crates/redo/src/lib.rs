//! Redo: the only thing that crosses from compute to storage (invariant 1), and the
//! one function that changes a page (invariant 2).
//!
//! ```text
//!   engine ── builds Op ──> volume assigns LSN + backlink ──> Record ──┬─> storage segments
//!     │                                                               └─> apply(page, record)
//!     └──────────── applies the same Record to its cached page ──────────────┘
//! ```
//!
//! * [`record`]: the wire and disk format of a record, CRC32C-protected.
//! * [`page`]: the slotted page layout shared by every page kind.
//! * [`apply`]: deterministic and total: a malformed or misapplied record yields an
//!   [`ApplyError`], never a panic, and leaves the page untouched.

pub mod page;
pub mod record;

pub use page::{Page, PageKind};
pub use record::{decode_header, DecodeError, ItemShrink, Op, Record, RecordHeader, CPL_FLAG};

use borealis_common::Lsn;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("record {lsn} is for page {record_page}, not page {page}")]
    WrongPage {
        lsn: Lsn,
        record_page: u64,
        page: u64,
    },
    #[error("record {lsn} does not follow page LSN {page_lsn}")]
    Stale { lsn: Lsn, page_lsn: Lsn },
    #[error("record {lsn}: {what}")]
    Invalid { lsn: Lsn, what: String },
}

/// Applies `record` to `page` (whose number is `page_no`). On success the page LSN
/// becomes the record's LSN. On error the page is unchanged.
///
/// Records must be applied in LSN order; applying one at or below the page LSN is an
/// error (callers that replay idempotently check `page.lsn()` first).
pub fn apply(page: &mut Page, page_no: u64, record: &Record) -> Result<(), ApplyError> {
    if record.page != page_no {
        return Err(ApplyError::WrongPage {
            lsn: record.lsn,
            record_page: record.page,
            page: page_no,
        });
    }
    if record.lsn <= page.lsn() {
        return Err(ApplyError::Stale {
            lsn: record.lsn,
            page_lsn: page.lsn(),
        });
    }
    let invalid = |what: String| ApplyError::Invalid {
        lsn: record.lsn,
        what,
    };
    // Every page mutator validates before it writes, so an error leaves `page` as it
    // was without copying it first.
    let next = page;
    match &record.op {
        Op::Init { kind } => {
            let kind = PageKind::from_u16(*kind)
                .ok_or_else(|| invalid(format!("unknown page kind {kind}")))?;
            *next = Page::new(kind);
        }
        Op::InsertItem { slot, data } => next.insert_item(*slot, data).map_err(invalid)?,
        Op::DeleteItem { slot } => next.delete_item(*slot).map_err(invalid)?,
        Op::ReplaceItem { slot, data } => next.replace_item(*slot, data).map_err(invalid)?,
        Op::TruncateItems { keep } => next.truncate_items(*keep).map_err(invalid)?,
        Op::SetLinks { next: link, aux } => next.set_links(*link, *aux),
        Op::InitWithItems {
            kind,
            next: link,
            aux,
            items,
        } => {
            let kind = PageKind::from_u16(*kind)
                .ok_or_else(|| invalid(format!("unknown page kind {kind}")))?;
            let mut fresh = Page::new(kind);
            fresh.set_links(*link, *aux);
            for (i, item) in items.iter().enumerate() {
                fresh.insert_item(i as u16, item).map_err(invalid)?;
            }
            *next = fresh;
        }
        Op::WriteSpecial { offset, data } => next.write_special(*offset, data).map_err(invalid)?,
        Op::StampLsn { offset } => next
            .write_special(*offset, &record.lsn.0.to_le_bytes())
            .map_err(invalid)?,
        Op::WriteBody { offset, data } => next.write_body(*offset, data).map_err(invalid)?,
        Op::StampLsnBody { offset } => next
            .write_body(*offset, &record.lsn.0.to_le_bytes())
            .map_err(invalid)?,
        Op::Noop => {}
        Op::ShrinkItems { items } => next.shrink_items(items).map_err(invalid)?,
    }
    next.set_lsn(record.lsn);
    Ok(())
}

#[cfg(test)]
mod tests;
